-- Failed attempts: when the next one is due, and whether the controller gave up.
--
-- A transition that fails is retried with back-off; next_attempt_at says when, so
-- `jobmesh job show` can. A failure that retrying cannot fix (a dump that does not
-- load, a snapshot that does not exist, a bad spec) sets gave_up instead: the
-- reconciler leaves the job alone (but deletes it when asked) until the user
-- retries it or wants something else of it.
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS and OR REPLACE.

ALTER TABLE jobs
    ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz,  -- the next retry (NULL: none due)
    ADD COLUMN IF NOT EXISTS gave_up boolean NOT NULL DEFAULT false;  -- error is permanent

-- As in 0001, plus the two new columns: a waiter learns at once that a job gave up.
CREATE OR REPLACE FUNCTION jobmesh_notify_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('jobmesh_jobs', OLD.id);
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' OR (OLD.state, OLD.desired_state, OLD.host, OLD.port, OLD.progress,
                            OLD.backend_password, OLD.error, OLD.attempts,
                            OLD.next_attempt_at, OLD.gave_up)
            IS DISTINCT FROM (NEW.state, NEW.desired_state, NEW.host, NEW.port, NEW.progress,
                              NEW.backend_password, NEW.error, NEW.attempts,
                              NEW.next_attempt_at, NEW.gave_up) THEN
        PERFORM pg_notify('jobmesh_jobs', NEW.id);
    END IF;
    RETURN NEW;
END $$;
