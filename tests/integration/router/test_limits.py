"""A job's max_connections holds across routers: each leases slots from the catalog, a
slot one router frees goes to another, and a dead router's lease lapses."""

from __future__ import annotations

import asyncio
import signal

import asyncpg
import pytest

from tests.support.catalog_harness import (
    add_user,
    dsn,
    running_job,
)
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


async def _connect(router) -> asyncpg.Connection:
    return await asyncpg.connect(dsn(router), timeout=30)


async def _refused(router) -> bool:
    try:
        conn = await _connect(router)
    except asyncpg.TooManyConnectionsError:
        return True
    await conn.close()
    return False


async def test_a_jobs_limit_holds_across_routers_and_follows_who_needs_it(
        catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await catalog.update_spec("alpha", {"max_connections": 3})
    await add_user(catalog, "alice", ("alpha", "write"))
    a = await routers.start(catalog.dsn, "--lease-ttl", "3")
    b = await routers.start(catalog.dsn, "--lease-ttl", "3")
    held = [await _connect(a), await _connect(a), await _connect(b)]
    try:
        assert await _refused(a) and await _refused(b)  # 3 in all, whichever router
        await held.pop(0).close()  # a frees one; b needs it: a's next renewal yields it

        async def b_gets_one() -> asyncpg.Connection | None:
            try:
                return await _connect(b)
            except asyncpg.TooManyConnectionsError:
                return None
        held.append(await until(b_gets_one, "the slot a freed to reach b"))
        assert await _refused(a) and await _refused(b)

        a.proc.send_signal(signal.SIGKILL)  # its lease of 1 lapses after --lease-ttl
        held.pop(0)  # (its connection died with it)
        held.append(await until(b_gets_one, "a's lapsed slot to reach b"))
        assert await _refused(b)
        rows = await catalog.pool.fetch(
            "select slots from router_leases where job_id = 'alpha' and expires_at > now()")
        assert sum(r["slots"] for r in rows) <= 3
    finally:
        await asyncio.gather(*(c.close() for c in held), return_exceptions=True)


async def test_connects_within_a_lease_do_not_ask_the_catalog(catalog, job_pg, routers):
    """A burst of connects costs one lease round trip, not one each (the headroom)."""
    await running_job(catalog, job_pg)
    await catalog.update_spec("alpha", {"max_connections": 40})
    await add_user(catalog, "alice", ("alpha", "write"))
    r = await routers.start(catalog.dsn)
    first = await _connect(r)
    [(slots, need)] = await catalog.pool.fetch(
        "select slots, need from router_leases where job_id = 'alpha'")
    assert (slots, need) == (5, 1)  # 1 in use and a tenth of the limit as headroom
    more = [await _connect(r) for _ in range(4)]  # within the lease: no round trip
    assert await catalog.pool.fetchval(
        "select need from router_leases where job_id = 'alpha'") == 1
    for c in [first, *more]:
        await c.close()
