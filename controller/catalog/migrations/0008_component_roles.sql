-- A catalog role per component: the controller (the migrator) owns the schema; routers
-- log in as jobmesh_router, which reads what routing needs and changes the catalog only
-- through the narrow functions below; jobmesh_stats reads jobs, events and snapshots
-- (no secret column) for dashboards and exporters.
--
-- The roles are made NOLOGIN here; whoever deploys gives them a password (`jobmesh up`
-- does, and ALTER ROLE jobmesh_router LOGIN PASSWORD '...' elsewhere). A migrator
-- without CREATEROLE (a managed PostgreSQL's application user) skips making them, and
-- the grants go to roles a DBA made beforehand; with neither, routers keep the
-- controller's credentials (the README's security section says what that costs).
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS and OR REPLACE.

DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['jobmesh_router', 'jobmesh_stats'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object THEN NULL;  -- another catalog of this cluster made it
                WHEN insufficient_privilege THEN
                    RAISE NOTICE 'cannot create role % (no CREATEROLE): a DBA makes it', r;
            END;
        END IF;
    END LOOP;
END $$;

-- A client's wake, the one write a router makes to a job: want it running unless it was
-- ended or deleted, with its event (idempotent: only the first of many asks changes it).
CREATE OR REPLACE FUNCTION jobmesh_request_wake(p_job text) RETURNS SETOF jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE j jobs;
BEGIN
    UPDATE jobs SET desired_state = 'running', last_active = now(), attempts = 0,
                    next_attempt_at = NULL, gave_up = false, updated_at = now()
        WHERE id = p_job AND desired_state = 'paused' RETURNING * INTO j;
    IF FOUND THEN
        INSERT INTO events (job_id, kind, from_state) VALUES (p_job, 'wake-requested', j.state);
        RETURN NEXT j;
    END IF;
END $$;

-- The router's admin console's SNAPSHOT_STOP: want a running job paused (never ended or
-- deleted), recording which admin principal asked.
CREATE OR REPLACE FUNCTION jobmesh_request_pause(p_job text, p_actor text) RETURNS SETOF jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE j jobs;
BEGIN
    UPDATE jobs SET desired_state = 'paused', attempts = 0, next_attempt_at = NULL,
                    gave_up = false, updated_at = now()
        WHERE id = p_job AND desired_state = 'running' RETURNING * INTO j;
    IF FOUND THEN
        INSERT INTO events (job_id, kind, detail, actor)
            VALUES (p_job, 'desired', '{"desired_state": "paused"}', p_actor);
        RETURN NEXT j;
    ELSE
        RETURN QUERY SELECT * FROM jobs WHERE id = p_job;
    END IF;
END $$;

-- The routers' other writes run as the functions' owner, with a fixed search path.
ALTER FUNCTION jobmesh_lease_slots(text, text, integer, integer, double precision)
    SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION jobmesh_router_heartbeat(text, text, integer, double precision)
    SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION jobmesh_router_report(text, text, jsonb, text[], double precision)
    SECURITY DEFINER SET search_path = public, pg_temp;

DO $$
BEGIN
    -- Functions are executable by PUBLIC by default: only the routers (and the owner).
    REVOKE EXECUTE ON FUNCTION jobmesh_request_wake(text), jobmesh_request_pause(text, text),
        jobmesh_lease_slots(text, text, integer, integer, double precision),
        jobmesh_router_heartbeat(text, text, integer, double precision),
        jobmesh_router_report(text, text, jsonb, text[], double precision) FROM PUBLIC;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobmesh_router') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO jobmesh_router', current_database());
        GRANT USAGE ON SCHEMA public TO jobmesh_router;
        GRANT SELECT ON jobs, principals, grants TO jobmesh_router;
        GRANT EXECUTE ON FUNCTION jobmesh_request_wake(text), jobmesh_request_pause(text, text),
            jobmesh_lease_slots(text, text, integer, integer, double precision),
            jobmesh_router_heartbeat(text, text, integer, double precision),
            jobmesh_router_report(text, text, jsonb, text[], double precision)
            TO jobmesh_router;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobmesh_stats') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO jobmesh_stats', current_database());
        GRANT USAGE ON SCHEMA public TO jobmesh_stats;
        -- every column of jobs but backend_password; no principals (verifiers)
        GRANT SELECT (id, desired_state, state, host, port, spec, progress, error, attempts,
                      last_active, created_at, updated_at, next_attempt_at, gave_up,
                      generation) ON jobs TO jobmesh_stats;
        GRANT SELECT ON events, snapshots, router_reports TO jobmesh_stats;
    END IF;
END $$;
