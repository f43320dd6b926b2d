-- The status page (controller/web): who did what, operators' sessions, and what the
-- routers see.
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS and OR REPLACE.

-- Events name who asked for them (a principal of the page or the API), and some belong
-- to no job (a login, a logout, a refused login).
ALTER TABLE events ALTER COLUMN job_id DROP NOT NULL;
ALTER TABLE events ADD COLUMN IF NOT EXISTS actor text;
CREATE INDEX IF NOT EXISTS events_transitions_at ON events (at) WHERE kind = 'transition';
CREATE INDEX IF NOT EXISTS events_mesh_at ON events (at) WHERE job_id IS NULL;

-- A logged-in operator. The cookie carries a random id; the catalog keeps only its
-- sha256, so whoever reads this table cannot use a session. ``verifier_md5`` is the
-- principal's verifier at login: a new password (or a new principal of that name) ends
-- the session, as does the principal's deletion.
CREATE TABLE IF NOT EXISTS web_sessions (
    id_sha256    bytea PRIMARY KEY,
    principal    text NOT NULL REFERENCES principals(name) ON DELETE CASCADE,
    verifier_md5 text NOT NULL,
    csrf         text NOT NULL,
    source       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    seen_at      timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_expires ON web_sessions (expires_at);

-- Each router process's report: its client connections per job (the page's "clients"
-- column), renewed every --activity-interval; it doubles as the router's heartbeat.
CREATE TABLE IF NOT EXISTS router_reports (
    id       text PRIMARY KEY,
    listen   text NOT NULL,
    clients  jsonb NOT NULL DEFAULT '{}',   -- {"job id": connections}
    ttl      double precision NOT NULL,     -- the report is stale after this many seconds
    seen_at  timestamptz NOT NULL
);

-- A router's report: its clients per job now, and the jobs it used (those with clients,
-- and ``p_touch``: a job whose last session just ended) have their idle clocks reset.
-- A ttl of 0 is a router's goodbye.
CREATE OR REPLACE FUNCTION jobmesh_router_report(p_id text, p_listen text, p_clients jsonb,
                                                 p_touch text[], p_ttl double precision)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_ttl <= 0 THEN  -- the router is stopping: it reports no more
        DELETE FROM router_reports WHERE id = p_id;
        RETURN;
    END IF;
    UPDATE jobs SET last_active = now()
        WHERE id IN (SELECT jsonb_object_keys(p_clients)) OR id = ANY(p_touch);
    INSERT INTO router_reports (id, listen, clients, ttl, seen_at)
        VALUES (p_id, p_listen, p_clients, p_ttl, now())
        ON CONFLICT (id) DO UPDATE
        SET listen = EXCLUDED.listen, clients = EXCLUDED.clients, ttl = EXCLUDED.ttl,
            seen_at = now();
    -- A router gone for ten of its intervals is forgotten (the page shows it missing
    -- before that).
    DELETE FROM router_reports WHERE seen_at < now() - make_interval(secs => 10 * ttl);
END $$;
