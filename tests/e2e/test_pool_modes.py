"""A job's pool mode through the whole mesh: set at create (``--pool-mode``), changed with
``jobmesh job update``; in transaction mode a client outlives its job's pause (its next
transaction wakes the job), since it holds no server connection between transactions. And
the admin console's lifecycle commands, SNAPSHOT_STOP and WAKE."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from jobmesh.controller.catalog.passwords import scram_verifier
from jobmesh.controller.mesh import ensure_secret, write_mesh
from tests.integration.controller.cli.test_damaged_dump import cli
from tests.support.mesh import Mesh
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)

PW = "pw-123"


def _pids(dsn: str) -> tuple[int, int]:
    """(the pid the client was told, the pid its query ran on)."""
    with psycopg.connect(dsn, connect_timeout=60, autocommit=True) as conn:
        return conn.info.backend_pid, conn.execute("select pg_backend_pid()").fetchone()[0]


async def test_job_update_switches_a_job_to_transaction_pooling(mesh: Mesh) -> None:
    await asyncio.to_thread(mesh.start_controller, "--idle-timeout", "0")
    await asyncio.to_thread(mesh.start_router)
    ensure_secret(mesh.root / "admin-password")
    write_mesh(mesh.root, f"http://127.0.0.1:{mesh.api_port}", "127.0.0.1", mesh.router_port,
               "admin")
    await mesh.add_user("alice", PW, alpha="write")
    code, out, err = await cli(mesh, "job", "create", "alpha")
    assert code == 0, err
    dsn = mesh.dsn("alpha", "alice", PW)
    told, ran = await asyncio.to_thread(_pids, dsn)
    assert told == ran  # session mode: the client's own backend

    code, out, err = await cli(mesh, "job", "update", "alpha", "--pool-mode", "transaction",
                               "--pool-size", "1")
    assert code == 0, err
    assert "pool_mode transaction, pool_size 1" in out

    def transaction_mode() -> bool:  # once the router has read the row NOTIFY named
        told, ran = _pids(dsn)
        return told != ran
    await until(transaction_mode, "the router in transaction mode")

    code, out, err = await cli(mesh, "job", "update", "alpha", "--pool-size", "0")
    assert code != 0 and err.count("\n") == 1 and "pool_size" in err and "Traceback" not in err
    code, out, err = await cli(mesh, "job", "update", "alpha")
    assert code == 2 and "nothing to change" in err


async def test_a_transaction_mode_client_outlives_its_jobs_pause(mesh: Mesh) -> None:
    await asyncio.to_thread(mesh.start_controller, "--idle-timeout", "0")
    await asyncio.to_thread(mesh.start_router)
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha", pool_mode="transaction", pool_size=2)
    conn = await psycopg.AsyncConnection.connect(mesh.dsn("alpha", "alice", PW),
                                                 connect_timeout=60, autocommit=True)
    try:
        await conn.execute("create table t (n int)")
        await conn.execute("insert into t values (1)")
        await mesh.pause("alpha")  # an idle transaction-mode client holds no backend
        await conn.execute("insert into t values (2)")  # woken by the next transaction
        cur = await conn.execute("select array_agg(n order by n) from t")
        assert await cur.fetchone() == ([1, 2],)  # nothing lost
        assert (await mesh.catalog.job("alpha")).state == "running"  # type: ignore[union-attr]
    finally:
        await conn.close()


async def test_the_consoles_snapshot_stop_and_wake_drive_the_jobs_lifecycle(mesh: Mesh) -> None:
    """SNAPSHOT_STOP and WAKE (not PAUSE, which only holds traffic) pause and wake a job."""
    await asyncio.to_thread(mesh.start_controller, "--idle-timeout", "0")
    await asyncio.to_thread(mesh.start_router)
    await mesh.catalog.create_principal("root", scram_verifier(PW), admin=True)
    await mesh.create_job("alpha")

    def console(command: str) -> None:
        dsn = mesh.dsn("alpha", "root", PW).replace("/job_alpha", "/jobmesh")
        with psycopg.connect(dsn, connect_timeout=30, autocommit=True,
                             cursor_factory=psycopg.ClientCursor) as conn:
            conn.execute(command)

    await asyncio.to_thread(console, "SNAPSHOT_STOP job_alpha")
    await mesh.wait_state("alpha", "paused")
    await asyncio.to_thread(console, "WAKE job_alpha")
    await mesh.wait_state("alpha", "running")
    kinds = [e.kind for e in await mesh.catalog.events("alpha")]
    assert "wake-requested" in kinds
