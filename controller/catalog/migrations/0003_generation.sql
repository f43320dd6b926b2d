-- Generations: every incarnation of a job (a create, a wake, a recovery) gets the next
-- number, which its agent claims in the store; a newer claim fences off an older
-- incarnation still running somewhere (agent/fence.py). Only ever increases.
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS.

ALTER TABLE jobs ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;
