"""Routers on the catalog find each other there: each registers its peer address with a
heartbeat, and a cancel sent to the wrong router reaches the one that issued its key with
no --peer list at all; a router that stops is forgotten."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import pytest

from jobmesh.agent.postgres import free_port
from tests.support.cancels import send_cancel, waiting_victim
from tests.support.catalog_harness import PW, add_user, running_job
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


async def test_a_cancel_to_the_wrong_router_reaches_its_issuer_through_the_registry(
        catalog, job_pg, routers, tmp_path: Path):
    await running_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    secret = tmp_path / "peer-secret"
    secret.write_text(secrets.token_hex(24))
    secret.chmod(0o600)

    async def start():
        return await routers.start(catalog.dsn, "--peer-listen", f"127.0.0.1:{free_port()}",
                                   "--peer-secret-file", str(secret), "--lease-ttl", "3")

    a, b = await start(), await start()  # (no --peer: nobody was told of the other)

    async def both_registered() -> bool:
        return await catalog.pool.fetchval("select count(*) from routers") == 2
    await until(both_registered, "both routers in the registry")

    async with waiting_victim(a.port, password=PW) as victim:
        async def cancelled_through_b() -> bool:
            send_cancel(b.port, victim.pid, victim.secret)  # to the router that did not issue
            return not await victim.blocked()
        await until(cancelled_through_b, "the cancel sent to b to reach a", interval=0.5)
        with pytest.raises(Exception, match="cancel"):
            await victim.waiting

    a.proc.send_signal(signal.SIGKILL)

    async def forgotten() -> bool:
        return await catalog.pool.fetchval("select count(*) from routers") == 1
    await until(forgotten, "the killed router forgotten after --lease-ttl")
