"""``AgentClient`` against a real ``jobmesh agent serve`` beside a real PostgreSQL 15.

The job's PostgreSQL is made by ``init_pgdata`` (archiving into its spool), the
store is a file:// directory, and the agent is the real daemon on a free port,
started with scheduled base backups off so that only the tests take snapshots.
Readiness is the agent's "listening" log line; every other wait is ``until``.
The agent and PostgreSQL are stopped in fixture finalisers, also when a test fails.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from jobmesh.agent.init import init_pgdata
from jobmesh.agent.manifest import Manifest, snapshot_manifest_key
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.agent.postmaster import read_postmaster
from jobmesh.agent.store import get_bytes
from jobmesh.controller.backends.agent_client import AgentClient, AgentStatus
from jobmesh.controller.core.backend import BackendError
from tests.support.process import LoggedProcess
from tests.support.stores import StoreSpec
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(180)

JOB = "client"
DB = f"job_{JOB}"
OPERATION_TIMEOUT = 120.0  # what the client allows a pause or a base backup


@dataclass
class Job:
    inst: Instance
    spool: Path
    store: StoreSpec


@dataclass
class Agent:
    process: LoggedProcess
    client: AgentClient


@pytest.fixture
def job(pg_root: Path, file_store: StoreSpec) -> Iterator[Job]:
    """A job's PostgreSQL from ``init_pgdata``, running and archiving into its spool."""
    base = pg_root / f"agent-client-{os.urandom(3).hex()}"
    base.mkdir()
    spool = base / "pgdata.spool"
    init_pgdata(base / "pgdata", JOB, spool=spool, archive_timeout=0)
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    try:
        inst.start()
        yield Job(inst, spool, file_store)
    finally:
        inst.stop_quietly()


@pytest.fixture
def agent(job: Job) -> Iterator[Agent]:
    """``jobmesh agent serve`` for ``job`` on a free port, and a client for it."""
    cmd = [sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
           "--pgdata", str(job.inst.datadir),
           "--spool", str(job.spool), *job.store.cli_args(JOB), "--listen", "127.0.0.1:0",
           "--base-backup-interval", "0"]
    process = LoggedProcess("agent", cmd)
    try:
        port = int(process.wait_for_log(r"agent listening on http://[\d.]+:(\d+)",
                                        timeout=60).group(1))
        yield Agent(process, AgentClient(f"http://127.0.0.1:{port}/", JOB, None))
    finally:
        process.stop()


async def stored_manifest(job: Job, sid: str) -> Manifest:
    store = job.store.open()
    try:
        return Manifest.from_json(await get_bytes(store, snapshot_manifest_key(JOB, sid)))
    finally:
        await store.close()


def write_rows(job: Job, n: int = 1000) -> None:
    job.inst.psql("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v text)", database=DB)
    job.inst.psql(f"INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, {n}) g "
                  "ON CONFLICT DO NOTHING", database=DB)


# --- status ------------------------------------------------------------------------------


async def test_status_of_a_running_job(job, agent):
    st = await agent.client.status()
    assert isinstance(st, AgentStatus)
    assert st.postgres_running is True
    assert st.paused is False and st.pausing is False
    assert st.last_snapshot is None and st.last_base_backup is None  # an empty store
    assert st.base_backup_running is False
    assert st.next_base_backup_in is None  # --base-backup-interval 0
    assert st.spool_backlog >= 0


async def test_status_follows_the_archived_wal_until_the_spool_is_empty(job, agent):
    await asyncio.to_thread(write_rows, job)
    segment = await asyncio.to_thread(job.inst.psql, "SELECT pg_walfile_name(pg_switch_wal())")

    async def shipped() -> AgentStatus | None:
        st = await agent.client.status()
        return st if st.last_archived == segment and st.spool_backlog == 0 else None

    st = await until(shipped, f"{segment} archived and shipped", timeout=60)
    assert st.postgres_running and not st.paused


# --- base backup ---------------------------------------------------------------------------


async def test_base_backup_returns_the_stored_manifest_of_kind_base(job, agent):
    await asyncio.to_thread(write_rows, job)
    manifest = await agent.client.base_backup(OPERATION_TIMEOUT)
    assert isinstance(manifest, Manifest)
    assert manifest.kind == "base" and manifest.job == JOB and manifest.id
    assert manifest.start_wal and manifest.end_wal
    assert await stored_manifest(job, manifest.id) == manifest

    st = await agent.client.status()
    assert st.last_base_backup is not None and st.last_snapshot is not None
    assert st.last_base_backup.id == st.last_snapshot.id == manifest.id
    assert st.last_base_backup.kind == "base"
    # what the backup stored (its new objects and label), as `agent list` counts it
    assert st.last_base_backup.size == manifest.stored_size > 0
    assert st.last_base_backup.created_at == manifest.created_at
    assert st.base_backup_running is False and st.paused is False


# --- pause -------------------------------------------------------------------------------


async def test_pause_returns_the_stored_manifest_and_status_says_paused(job, agent):
    await asyncio.to_thread(write_rows, job)
    before = await agent.client.status()
    assert before.paused is False and before.postgres_running is True

    manifest = await agent.client.pause(OPERATION_TIMEOUT)
    assert isinstance(manifest, Manifest)
    assert manifest.kind == "pause" and manifest.job == JOB and manifest.id
    assert await stored_manifest(job, manifest.id) == manifest
    assert read_postmaster(job.inst.datadir) is None  # the agent stopped PostgreSQL

    after = await agent.client.status()
    assert after.paused is True and after.pausing is False
    assert after.postgres_running is False
    assert after.last_snapshot is not None and after.last_snapshot.id == manifest.id
    assert after.last_snapshot.kind == "pause"
    assert after.spool_backlog == 0  # drained before the snapshot


async def test_a_repeated_pause_returns_the_same_snapshot(job, agent):
    first = await agent.client.pause(OPERATION_TIMEOUT)
    second = await agent.client.pause(OPERATION_TIMEOUT)
    assert second == first


# --- refusals ----------------------------------------------------------------------------


async def test_base_backup_after_the_pause_is_a_backend_error_quoting_the_agent(job, agent):
    await agent.client.pause(OPERATION_TIMEOUT)
    with pytest.raises(BackendError) as info:
        await agent.client.base_backup(OPERATION_TIMEOUT)  # the agent answers 409
    assert str(info.value) == (f"the agent of job {JOB} could not take a base backup: "
                               "the job is paused: no base backups")
    assert (await agent.client.status()).paused is True  # the refusal changed nothing


async def test_base_backup_with_postgres_stopped_behind_its_back_is_a_backend_error(job, agent):
    await asyncio.to_thread(job.inst.stop, "fast")  # not a pause: the agent did not do it
    with pytest.raises(BackendError) as info:
        await agent.client.base_backup(OPERATION_TIMEOUT)  # the agent answers 409
    assert str(info.value) == (f"the agent of job {JOB} could not take a base backup: "
                               f"PostgreSQL is not running on {job.inst.datadir}")
    st = await agent.client.status()
    assert st.postgres_running is False and st.paused is False


async def test_a_failed_base_backup_is_a_backend_error_quoting_the_agent(job, agent):
    # The store's directory becomes a plain file: the agent cannot write the backup (500).
    root = job.store.root
    assert root is not None
    aside = root.with_name(root.name + ".aside")
    root.rename(aside)
    try:
        root.write_text("not a directory\n")
        with pytest.raises(BackendError) as info:
            await agent.client.base_backup(OPERATION_TIMEOUT)
    finally:
        root.unlink(missing_ok=True)
        aside.rename(root)
    message = str(info.value)
    assert message.startswith(f"the agent of job {JOB} could not take a base backup: "), message
    # the first write (the store's key file, or the writer's lease) is what fails
    assert f"{root}/" in message and "Not a directory" in message, message
    assert "\n" not in message
    # (the line may still be on its way through the log pipe: wait for it)
    await asyncio.to_thread(agent.process.wait_for_log, "base backup failed")
    st = await agent.client.status()  # the agent is still there, the job still running
    assert st.postgres_running is True and st.last_base_backup is None
    assert st.base_backup_running is False


# --- no agent ------------------------------------------------------------------------------


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback port that is bound but not listening (held, so nobody else takes it):
    every connection to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("ask", ["status", "pause", "base_backup"])
async def test_an_agent_that_is_not_listening_is_connection_refused_at_once(refusing_url, ask):
    client = AgentClient(refusing_url, JOB, None)
    call = {"status": lambda: client.status(),
            "pause": lambda: client.pause(OPERATION_TIMEOUT),
            "base_backup": lambda: client.base_backup(OPERATION_TIMEOUT)}[ask]
    started = time.monotonic()
    with pytest.raises(aiohttp.ClientError) as info:
        await call()
    elapsed = time.monotonic() - started
    assert isinstance(info.value, aiohttp.ClientConnectorError), repr(info.value)
    assert info.value.os_error.errno == errno.ECONNREFUSED, repr(info.value)
    assert elapsed < 5, f"took {elapsed:.1f} s: a refusal, not a timeout"
