-- The routers of the fleet, as each sees the others: a router that hears forwarded
-- cancels (--peer-listen) registers its address here and renews it (a heartbeat);
-- the others ask it about cancel keys they did not issue (PgBouncer's [peers], without
-- a list to keep). A router that stops renewing is forgotten after its ttl.
--
-- Idempotent, though schema.py runs it once: IF NOT EXISTS and OR REPLACE.

CREATE TABLE IF NOT EXISTS routers (
    id text PRIMARY KEY,
    peer_host text NOT NULL,
    peer_port integer NOT NULL CHECK (peer_port BETWEEN 1 AND 65535),
    seen_at timestamptz NOT NULL
);

-- Renew p_id's registration; the live peer addresses of the other routers.
CREATE OR REPLACE FUNCTION jobmesh_router_heartbeat(p_id text, p_host text, p_port integer,
                                                    p_ttl double precision)
RETURNS TABLE (o_host text, o_port integer) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO routers (id, peer_host, peer_port, seen_at)
        VALUES (p_id, p_host, p_port, now())
        ON CONFLICT (id) DO UPDATE
        SET peer_host = EXCLUDED.peer_host, peer_port = EXCLUDED.peer_port, seen_at = now();
    DELETE FROM routers WHERE seen_at < now() - make_interval(secs => p_ttl);
    RETURN QUERY SELECT DISTINCT r.peer_host, r.peer_port FROM routers r
        WHERE r.id <> p_id AND (r.peer_host, r.peer_port) <> (p_host, p_port);
END $$;
