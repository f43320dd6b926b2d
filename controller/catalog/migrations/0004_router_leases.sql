-- Per-job client limits across routers: each router leases slots of a job's
-- max_connections (its spec) and renews the lease in the background, so that the sum
-- of live leases never passes the limit and no connect waits for the catalog while its
-- router has a free leased slot. A router that dies stops renewing: its lease expires
-- after its ttl and the slots go to the others.
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS and OR REPLACE.

CREATE TABLE IF NOT EXISTS router_leases (
    job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    router_id text NOT NULL,
    slots integer NOT NULL CHECK (slots >= 0),
    need integer NOT NULL CHECK (need >= 0),  -- in use, plus the connect that asked
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (job_id, router_id)
);

-- Lease (renew, shrink) p_router's slots of p_job for p_ttl seconds: p_want (what it
-- needs plus some headroom, so a burst of connects is one round trip), or only p_need
-- while another router is short of what it needs (headroom yields to need), or what
-- the other routers' live leases leave of the limit. Returns the slots granted. A job
-- without a limit grants everything. The job's row is locked: two routers leasing at
-- once are counted one after the other.
CREATE OR REPLACE FUNCTION jobmesh_lease_slots(p_job text, p_router text, p_need integer,
                                               p_want integer, p_ttl double precision)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    lim integer;
    others integer;
    short boolean;
    granted integer;
BEGIN
    SELECT (spec ->> 'max_connections')::integer INTO lim FROM jobs WHERE id = p_job
        FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    DELETE FROM router_leases WHERE job_id = p_job AND expires_at <= now();
    IF lim IS NULL THEN
        DELETE FROM router_leases WHERE job_id = p_job AND router_id = p_router;
        RETURN p_want;
    END IF;
    SELECT COALESCE(sum(slots), 0), COALESCE(bool_or(need > slots), false)
        INTO others, short FROM router_leases
        WHERE job_id = p_job AND router_id <> p_router;
    granted := greatest(0, least(CASE WHEN short THEN p_need ELSE p_want END,
                                 lim - others));
    IF granted = 0 AND p_need = 0 THEN
        DELETE FROM router_leases WHERE job_id = p_job AND router_id = p_router;
    ELSE  -- (a lease of 0 slots still says what its router needs)
        INSERT INTO router_leases (job_id, router_id, slots, need, expires_at)
            VALUES (p_job, p_router, granted, p_need, now() + make_interval(secs => p_ttl))
            ON CONFLICT (job_id, router_id) DO UPDATE
            SET slots = EXCLUDED.slots, need = EXCLUDED.need,
                expires_at = EXCLUDED.expires_at;
    END IF;
    RETURN granted;
END $$;
