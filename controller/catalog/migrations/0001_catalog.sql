-- The catalog: the one source of truth for jobs, who may reach them, and what happened.

CREATE TABLE jobs (
    id               text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,58}$'),
    -- what the operator (or a router's wake) wants; the reconciler makes state follow it
    desired_state    text NOT NULL CHECK (desired_state IN ('running', 'paused', 'ended', 'deleted')),
    -- what the controller last established (intermediate states record work in flight)
    state            text NOT NULL CHECK (state IN ('creating', 'running', 'pausing', 'paused',
                         'resuming', 'ending', 'ended', 'failed', 'recovering', 'deleting')),
    host             text,            -- where the job's Postgres listens, while running
    port             integer,
    agent_url        text,            -- the agent's HTTP API, while running
    backend_password text NOT NULL,   -- the job's roles' password (routers log in with it)
    spec             jsonb NOT NULL DEFAULT '{}',  -- resources, archive_timeout, source
    progress         text,            -- what a transition is doing now, for waiting clients
    error            text,            -- why the last transition failed
    attempts         integer NOT NULL DEFAULT 0,   -- failed attempts of the current transition
    last_active      timestamptz NOT NULL DEFAULT now(),  -- routers touch it while in use
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE principals (
    name       text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 63),
    verifier   text NOT NULL,         -- SCRAM-SHA-256$<iterations>:<salt>$<stored>:<server>
    admin      boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE grants (
    principal  text NOT NULL REFERENCES principals(name) ON DELETE CASCADE,
    pattern    text NOT NULL,         -- a job id or a glob: scrape-*, *
    access     text NOT NULL CHECK (access IN ('read', 'write')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, pattern)
);

CREATE TABLE snapshots (
    job_id      text NOT NULL,        -- no FK: snapshots outlive a deleted job's row
    id          text NOT NULL,
    kind        text NOT NULL,        -- pause, base, dump
    size_bytes  bigint,
    stored_bytes bigint,
    manifest    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, id)
);

CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind        text NOT NULL,        -- transition, wake-requested, error, ...
    from_state  text,
    to_state    text,
    duration_ms double precision,     -- how long the transition took
    bytes       bigint,               -- bytes moved (snapshot uploaded, restore downloaded)
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_job_at ON events (job_id, at);

-- Routers and the controller LISTEN; only changes that matter to them are announced
-- (not the routers' frequent last_active touches).
CREATE FUNCTION jobmesh_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('jobmesh_jobs', OLD.id);
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' OR (OLD.state, OLD.desired_state, OLD.host, OLD.port, OLD.progress,
                            OLD.backend_password, OLD.error, OLD.attempts)
            IS DISTINCT FROM (NEW.state, NEW.desired_state, NEW.host, NEW.port, NEW.progress,
                              NEW.backend_password, NEW.error, NEW.attempts) THEN
        PERFORM pg_notify('jobmesh_jobs', NEW.id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobmesh_notify_job();

CREATE FUNCTION jobmesh_notify_principal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'grants' THEN
        PERFORM pg_notify('jobmesh_principals', COALESCE(NEW.principal, OLD.principal));
    ELSE
        PERFORM pg_notify('jobmesh_principals', COALESCE(NEW.name, OLD.name));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER principals_notify AFTER INSERT OR UPDATE OR DELETE ON principals
    FOR EACH ROW EXECUTE FUNCTION jobmesh_notify_principal();
CREATE TRIGGER grants_notify AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH ROW EXECUTE FUNCTION jobmesh_notify_principal();
