"""The mesh end to end, real processes only: catalog, controller (local backend), router,
job PostgreSQL instances with their agents, and real clients (psql, psycopg, asyncpg).

Over ~400 lines on purpose: one specification per behaviour of the whole mesh, sharing
its fixtures; the helpers it needs live in tests/support/.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest

from jobmesh.agent.postgres import free_port
from jobmesh.defaults import WAL_WINDOW
from tests.support.kube_mesh import KubeMesh
from tests.support.ledger import Ledger
from tests.support.mesh import Mesh, children_of, psql
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)
PW = "pw-123"
# What a client sees when a pause ends its session or cuts its connect short: a socket
# error, Postgres's FATAL 57P01, asyncpg's "connection was closed in the middle of
# operation" (InterfaceError) or a FATAL arriving between two statements
# (InternalClientError), or the stream ending mid-message.
DISCONNECTED = (OSError, EOFError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError)


async def connect_error(dsn: str) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as err:
        conn = await asyncpg.connect(dsn, timeout=60)
        await conn.close()
    return err.value


@dataclass
class Deployed:
    """A mesh on one backend, as the backend-independent tests need it."""

    mesh: Mesh
    instance_gone: Callable[[str], bool]  # no process (local) or pod (kubernetes) is left


@pytest.fixture(params=["local", "kubernetes"])
def deployed(request: pytest.FixtureRequest) -> Deployed:
    if request.param == "local":
        mesh: Mesh = request.getfixturevalue("mesh")
        mesh.start_controller("--idle-timeout", "0")
        return Deployed(mesh, lambda job_id: mesh.job_processes(job_id) == [])
    k: KubeMesh = request.getfixturevalue("kube")
    k.start_controller()
    return Deployed(k.mesh, lambda job_id: k.pod(job_id) is None
                    and k.kubelet.pids(f"job-{job_id}") == [])


async def test_write_pause_and_wake_on_connect(deployed: Deployed) -> None:
    """The same on both backends: create, write through the router with psql and
    psycopg, pause (the instance is gone, its snapshot is in the store), connect again:
    the job wakes and the data is there."""
    mesh = deployed.mesh
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha")
    dsn = mesh.dsn("alpha", "alice", PW)
    psql(dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (2)")

    await mesh.pause("alpha")
    assert deployed.instance_gone("alpha")
    snaps = await mesh.catalog.snapshots("alpha")
    assert snaps and snaps[-1]["kind"] == "pause"

    with psycopg.connect(dsn, connect_timeout=90) as conn:  # wakes the job
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (3,)
    assert psql(dsn, "SELECT count(*) FROM t") == "2"
    assert await mesh.transitions("alpha", "resuming") == 1
    metrics = await mesh.controller_metrics()
    assert metrics['jobmesh_wake_seconds_count'] == 1
    assert metrics['jobmesh_transition_seconds_count{action="pause"}'] == 1
    assert metrics['jobmesh_transition_seconds_count{action="resume"}'] == 1
    assert metrics['jobmesh_bytes_moved_total{direction="stored"}'] > 0


async def test_a_local_pause_leaves_no_job_directory_and_its_manifest_in_the_store(
        mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0", "--warm-cache-bytes", "0")
    await mesh.create_job("alpha")
    await mesh.pause("alpha")
    assert not (mesh.root / "jobs" / "alpha").exists()
    snaps = await mesh.catalog.snapshots("alpha")
    assert (mesh.root / "store" / "alpha" / "snapshots" / snaps[-1]["id"] / "manifest.json"
            ).exists()


async def test_a_hundred_clients_share_one_wake(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha")
    psql(mesh.dsn("alpha", "alice", PW), "CREATE TABLE t AS SELECT 42 AS x")
    await mesh.pause("alpha")

    async def client() -> int:
        conn = await asyncpg.connect(mesh.dsn("alpha", "alice", PW), timeout=120)
        try:
            return await conn.fetchval("SELECT x FROM t")
        finally:
            await conn.close()

    results = await asyncio.gather(*(client() for _ in range(100)))
    assert results == [42] * 100
    assert await mesh.transitions("alpha", "resuming") == 1
    assert len(await mesh.catalog.events("alpha", kind="wake-requested")) == 1


async def test_bad_password_and_missing_grant_wake_nothing(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.add_user("bob", PW, beta="write")
    await mesh.create_job("alpha")
    await mesh.pause("alpha")

    assert (await connect_error(mesh.dsn("alpha", "alice", "wrong"))).sqlstate == "28P01"
    assert (await connect_error(mesh.dsn("alpha", "nobody", PW))).sqlstate == "28P01"
    assert (await connect_error(mesh.dsn("alpha", "bob", PW))).sqlstate == "42501"
    assert await mesh.catalog.events("alpha", kind="wake-requested") == []
    job = await mesh.catalog.job("alpha")
    assert job is not None and (job.state, job.desired_state) == ("paused", "paused")


async def test_a_reader_cannot_write_whatever_it_sets(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.add_user("rita", PW, alpha="read")
    await mesh.create_job("alpha")
    psql(mesh.dsn("alpha", "alice", PW), "CREATE TABLE t AS SELECT 1 AS x")
    conn = await asyncpg.connect(mesh.dsn("alpha", "rita", PW), timeout=60)
    try:
        assert await conn.fetchval("SELECT x FROM t") == 1
        await conn.execute("SET default_transaction_read_only = off")
        await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        for sql in ("INSERT INTO t VALUES (2)", "UPDATE t SET x = 3", "DELETE FROM t",
                    "CREATE TABLE u (y int)", "DROP TABLE t", "SET ROLE job_owner"):
            with pytest.raises(asyncpg.PostgresError) as err:
                await conn.execute(sql)
            assert err.value.sqlstate == "42501", sql
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await conn.close()


async def test_no_committed_row_is_lost_across_pauses_and_resumes(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha")
    dsn = mesh.dsn("alpha", "alice", PW)
    psql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    committed = Committed()
    done = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not done.is_set():
            try:
                conn = await asyncpg.connect(dsn, timeout=120)
            except DISCONNECTED:
                await asyncio.sleep(0.1)  # refused or cut off: try again shortly
                continue
            try:
                while not done.is_set():
                    i += 1
                    await conn.execute("INSERT INTO t VALUES ($1)", i)
                    committed.append(i)  # only after the commit was acknowledged
            except DISCONNECTED:
                # The pause ended the session (asyncpg reports Postgres's FATAL 57P01
                # arriving between two statements as an InternalClientError); the
                # fate of the row in flight is unknown, so it is not counted.
                pass
            finally:
                conn.terminate()

    task = asyncio.create_task(writer())
    try:
        for _ in range(3):
            await committed.reached(len(committed) + 50)
            await pause_despite_clients(mesh, "alpha")
            await mesh.wait_state("alpha", "running")  # the writer's reconnect wakes it
        await committed.reached(len(committed) + 50)
    finally:
        done.set()
        await task
    present = {r[0] for r in await _fetch(dsn, "SELECT id FROM t")}
    assert set(committed) <= present
    assert await mesh.transitions("alpha", "paused") == 3
    # Each incarnation (the create, three wakes) claims its own generation in the store
    # (its agent does, at its start, before it uploads anything).
    job = await mesh.wait_state("alpha", "running")
    claims = await until(lambda: _claims(mesh, "alpha", job.generation),
                         f"generation {job.generation} to be claimed")
    assert len(claims) >= 4, claims


async def test_killed_controller_finishes_a_pause_and_a_resume(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha")
    dsn = mesh.dsn("alpha", "alice", PW)
    # Enough data that the pause snapshot takes a moment.
    psql(dsn, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v "
              "FROM generate_series(1, 300000) g")

    await mesh.catalog.set_desired("alpha", "paused")
    await mesh.wait_state("alpha", "pausing")
    assert mesh.controller is not None
    mesh.controller.kill()
    mesh.start_controller()
    await mesh.wait_state("alpha", "paused")
    assert mesh.job_processes("alpha") == []

    await mesh.catalog.set_desired("alpha", "running")
    await mesh.wait_state("alpha", "resuming")
    mesh.controller.kill()
    mesh.start_controller()
    await mesh.wait_state("alpha", "running")
    assert psql(dsn, "SELECT count(*) FROM t") == "300000"
    assert len(mesh.job_processes("alpha")) >= 2  # postgres and its agent


async def test_a_killed_postgres_recovers_in_place_and_loses_no_commit(mesh: Mesh) -> None:
    dsn = await _writable_job(mesh)
    ledger = Ledger(dsn)
    writers = [asyncio.create_task(ledger.write(w)) for w in range(4)]
    try:
        await ledger.until_acknowledged(2000)
        # The whole instance dies at once (as in an OOM kill of its container): the
        # postmaster and every backend, so no session outlives it.
        postmaster, agent = _pids(mesh.root / "jobs/alpha")
        killing = time.monotonic()
        for pid in [postmaster, *children_of(postmaster)]:
            os.kill(pid, signal.SIGKILL)
        killed_at = len(ledger.acknowledged)
        await ledger.until_acknowledged(killed_at + 2000, timeout=120)  # writing again
    finally:
        ledger.stop.set()
        await asyncio.gather(*writers)
    present = {r[0] for r in await _fetch(dsn, "SELECT id FROM t")}
    lost = set(ledger.acknowledged) - present
    print(f"\nkill -9 of the whole PostgreSQL under 4 writers: {len(lost)} of "
          f"{len(ledger.acknowledged)} acknowledged commits lost; reconnects held "
          f"{ledger.reconnects}, refused {len(ledger.refused)}; writing again "
          f"{ledger.first_after(killing) - killing:.2f} s after the kill")
    assert not lost, f"{len(lost)} acknowledged commits lost, e.g. {sorted(lost)[:5]}"
    assert ledger.reconnects >= 4 and not ledger.refused, ledger.refused[:3]
    # Held either way: by the router until the job answered, or, once the controller had
    # marked it failed, as a wake.
    mesh.router.wait_for_log(r"job alpha is not answering \(.*\): holding a client"
                             r"|waking job alpha \((failed|recovering)\)")
    recovered = [e for e in await mesh.catalog.events("alpha", kind="transition")
                 if e.from_state == "recovering" and e.to_state == "running"]
    assert len(recovered) == 1 and recovered[0].detail.get("in_place") is True, recovered
    assert recovered[0].bytes == 0  # nothing came from the store
    # The agent beside it lived on and serves the restarted server.
    assert _pids(mesh.root / "jobs/alpha")[1] == agent


async def _writable_job(mesh: Mesh) -> str:
    """A mesh with job alpha, its table t, its first base backup, and alice's DSN to it."""
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha")
    dsn = mesh.dsn("alpha", "alice", PW)
    psql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    await mesh.wait_for_base_backup("alpha")
    return dsn


def _pids(job_dir: Path) -> tuple[int, int]:
    """The local job's postmaster and agent (the agent host, beside the jobs' directory)."""
    postmaster = int((job_dir / "pgdata/postmaster.pid").read_text().split()[0])
    host = job_dir.parent.parent / "agent-host.json"
    return postmaster, json.loads(host.read_text())["pid"]


async def test_a_lost_disk_loses_at_most_the_wal_window(mesh: Mesh) -> None:
    dsn = await _writable_job(mesh)
    ledger = Ledger(dsn)
    writers = [asyncio.create_task(ledger.write(w)) for w in range(2)]
    try:
        await ledger.until_acknowledged(100)
        await asyncio.sleep(3 * WAL_WINDOW)  # the workload: writing for three windows
        # The machine is gone: its PostgreSQL, its agent and its disk.
        job_dir = mesh.root / "jobs/alpha"
        postmaster, agent = _pids(job_dir)
        killing = time.monotonic()
        for pid in [agent, postmaster, *children_of(postmaster)]:
            os.kill(pid, signal.SIGKILL)
        died = time.monotonic()
        gone = job_dir.rename(job_dir.with_name(".lost-alpha"))  # at once, then deleted
        shutil.rmtree(gone, ignore_errors=True)
        lost_at = len(ledger.acknowledged)
        await ledger.until_acknowledged(lost_at + 500, timeout=180)  # writing again
    finally:
        ledger.stop.set()
        await asyncio.gather(*writers)
    present = {r[0] for r in await _fetch(dsn, "SELECT id FROM t")}
    lost = sorted(set(ledger.acknowledged) - present)
    oldest = max((died - ledger.acknowledged_at[i] for i in lost), default=0.0)
    print(f"\nlost disk under 2 writers, default WAL window {WAL_WINDOW:g} s: {len(lost)} "
          f"of {len(ledger.acknowledged)} acknowledged commits lost, the oldest "
          f"{oldest:.2f} s before the kill; writing again "
          f"{ledger.first_after(killing) - killing:.2f} s after it")
    # The window, plus the upload of the last delta that was under way (a bound, not a speed).
    assert oldest <= WAL_WINDOW + 2.0, (len(lost), oldest)
    recovered = [e for e in await mesh.catalog.events("alpha", kind="transition")
                 if e.from_state == "recovering" and e.to_state == "running"]
    assert len(recovered) == 1 and recovered[0].detail.get("source") == "store", recovered
    job = await mesh.wait_state("alpha", "running")  # the recovery's claim fences the old:
    await until(lambda: _claims(mesh, "alpha", job.generation), "the recovery's claim")


async def _claims(mesh: Mesh, job_id: str, newest: int) -> list[int]:
    """The generations claimed in the (file) store, oldest first, once ``newest`` is."""
    claims = sorted(int(p.name.removesuffix(".json"))
                    for p in (mesh.root / "store" / job_id / "generations").iterdir()
                    if not p.name.startswith("."))  # a claim being written (.partial)
    return claims if claims and claims[-1] == newest else []


async def test_idle_jobs_are_paused(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "1")
    mesh.start_router()
    await mesh.create_job("alpha")
    await mesh.wait_state("alpha", "paused")
    assert [e.kind for e in await mesh.catalog.events("alpha", kind="idle")] == ["idle"]


async def test_a_backend_kept_for_the_next_client_does_not_keep_its_job_awake(
        mesh: Mesh) -> None:
    """The router keeps a leaving client's backend (session pooling); that is no session:
    the job still pauses when idle, and its next client wakes it on a fresh backend."""
    metrics = free_port()
    mesh.start_controller("--idle-timeout", "2")
    mesh.start_router("--server-idle-timeout", "3600", "--metrics", f"127.0.0.1:{metrics}")
    await mesh.add_user("alice", PW, alpha="write")
    await mesh.create_job("alpha")
    dsn = mesh.dsn("alpha", "alice", PW)

    def kept() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            return 'jobmesh_router_server_connections_idle{job="alpha"} 1.0' in r.read().decode()

    first = psql(dsn, "SELECT pg_backend_pid()")
    await until(kept, "the backend kept for the next client")
    assert psql(dsn, "SELECT pg_backend_pid()") == first  # kept, and reused
    await until(kept, "the backend kept again")
    await mesh.wait_state("alpha", "paused")  # the kept backend did not hold it up
    assert psql(dsn, "SELECT pg_backend_pid()") != first  # woken: a new server
    assert (await mesh.catalog.job("alpha")).state == "running"


async def test_max_running_evicts_the_least_recently_active_job(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0", "--max-running", "2", "--quiet-for", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, star="write")
    await mesh.create_job("alpha")
    await mesh.create_job("beta")
    psql(mesh.dsn("beta", "alice", PW), "SELECT 1")  # beta is the more recently active
    await mesh.create_job("gamma")
    await mesh.wait_state("alpha", "paused")
    assert (await mesh.catalog.job("beta")).state == "running"  # type: ignore[union-attr]
    assert [e.kind for e in await mesh.catalog.events("alpha", kind="evicted")] == ["evicted"]


async def test_a_job_reads_another_through_the_router_only_with_a_grant(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("alice", PW, star="write")
    await mesh.add_user("job-a", PW, beta="read")
    await mesh.add_user("job-c", PW, gamma="read")
    await mesh.create_job("alpha")
    await mesh.create_job("beta")
    psql(mesh.dsn("beta", "alice", PW), "CREATE TABLE t AS SELECT 7 AS x")
    await mesh.pause("beta")
    link = (f"host=127.0.0.1 port={mesh.router_port} dbname=job_beta password={PW} "
            "connect_timeout=90 user=")
    query = "SELECT x FROM dblink($1, 'SELECT x FROM t') AS r(x int)"
    conn = await asyncpg.connect(mesh.dsn("alpha", "alice", PW), timeout=60)
    try:
        assert await conn.fetchval(query, link + "job-a") == 7  # wakes beta
        with pytest.raises(asyncpg.PostgresError) as err:
            await conn.fetchval(query, link + "job-c")
        assert "has no grant on job" in str(err.value), err.value
        # postgres_fdw, the same way: a foreign table in A over B's table.
        await conn.execute(
            f"CREATE SERVER beta FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1',"
            f" port '{mesh.router_port}', dbname 'job_beta');"
            f" CREATE USER MAPPING FOR CURRENT_USER SERVER beta"
            f" OPTIONS (user 'job-a', password '{PW}');"
            " CREATE SCHEMA remote; IMPORT FOREIGN SCHEMA public LIMIT TO (t)"
            " FROM SERVER beta INTO remote")
        assert await conn.fetchval("SELECT x FROM remote.t") == 7
    finally:
        await conn.close()


async def pause_despite_clients(mesh: Mesh, job_id: str, attempts: int = 5) -> None:
    """Pause a job that a client keeps using. A client that connects after the pause was
    asked for but before it started wants the job running, and the router's wake wins
    (by design); then ask again, until a pause really happens.

    Decided on the transition events, not on the job's state as read at some moment: the
    client's reconnect can take the job from paused to resuming before a reader looks."""
    paused_before = await mesh.transitions(job_id, "paused")
    for _ in range(attempts):
        pausing_before = await mesh.transitions(job_id, "pausing")

        async def began(before: int = pausing_before) -> bool:
            return await mesh.transitions(job_id, "pausing") > before

        async def began_or_woken() -> bool:
            if await began():
                return True
            job = await mesh.catalog.job(job_id)
            return job is not None and job.desired_state == "running"

        await mesh.catalog.set_desired(job_id, "paused")
        await mesh.wait_until(job_id, began_or_woken, "a pause or a wake")
        if await began():

            async def paused() -> bool:
                return await mesh.transitions(job_id, "paused") > paused_before

            await mesh.wait_until(job_id, paused, "the end of the pause")
            assert await mesh.transitions(job_id, "paused") == paused_before + 1
            return
    raise AssertionError(f"job {job_id} was woken before every one of {attempts} pauses")


class Committed(list[int]):
    """Ids whose commit was acknowledged; ``reached(n)`` awaits the n-th."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def append(self, i: int) -> None:
        super().append(i)
        for n, fut in self._waiters:
            if len(self) >= n and not fut.done():
                fut.set_result(None)

    async def reached(self, n: int, timeout: float = 120) -> None:
        if len(self) >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await asyncio.wait_for(fut, timeout)


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=120)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()
