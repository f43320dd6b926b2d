-- Stats principals (PgBouncer's stats_users): they may log in to the router's admin
-- console and run its SHOW commands, nothing else (an exporter's credential cannot act).
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS.

ALTER TABLE principals ADD COLUMN IF NOT EXISTS stats boolean NOT NULL DEFAULT false;
