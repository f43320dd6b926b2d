"""``jobmesh agent serve`` as a process: a real PostgreSQL made by ``agent init``, moto S3.

Every wait polls HTTP or the store against a deadline; every process is
stopped in a fixture finaliser, also when the test fails.

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures; its helpers live in tests/support.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from jobmesh.agent.dump import load
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.manifest import Manifest, snapshot_manifest_key, wal_key
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.agent.postgres import pid_alive as alive
from jobmesh.agent.postmaster import read_postmaster, wait_for_exit
from jobmesh.agent.restore import restore
from jobmesh.agent.snapshot import check_stopped_pgdata
from jobmesh.agent.store import get_bytes, open_store
from tests.support.process import LoggedProcess

pytestmark = pytest.mark.timeout(180)

JOB = "served"
DB = f"job_{JOB}"


@dataclass
class Job:
    inst: Instance
    spool: Path
    store_url: str
    s3_endpoint: str


@pytest.fixture
def job(pg_root: Path, s3_server) -> Iterator[Job]:
    """A job's PostgreSQL from ``init_pgdata``, running and archiving into its spool."""
    base = pg_root / f"serve-{os.urandom(3).hex()}"
    base.mkdir()
    spool = base / "pgdata.spool"  # the default spool of `agent serve`
    init_pgdata(base / "pgdata", JOB, spool=spool, archive_timeout=0)
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    inst.start()
    bucket = s3_server.create_bucket(f"serve-{os.urandom(4).hex()}")
    try:
        yield Job(inst, spool, f"s3://{bucket}/jobs", s3_server.endpoint)
    finally:
        inst.stop_quietly()


class AgentProcess(LoggedProcess):
    """``jobmesh agent serve``, and its HTTP API."""

    port = 0

    def request(self, method: str, path: str, timeout: float = 120) -> tuple[int, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            status, body, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
        return status, json.loads(body) if "json" in ctype else body.decode()

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str) -> tuple[int, Any]:
        return self.request("POST", path)


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def start(job: Job, *extra: str, s3_endpoint: str | None = None) -> AgentProcess:
        cmd = [sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
               "--pgdata", str(job.inst.datadir), "--store", job.store_url, "--job", JOB,
               "--s3-endpoint", s3_endpoint or job.s3_endpoint, "--listen", "127.0.0.1:0",
               "--base-backup-interval", "0", *extra]
        agent = AgentProcess("agent", cmd)
        agents.append(agent)
        agent.port = int(agent.wait_for_log(r"agent listening on http://[\d.]+:(\d+)").group(1))
        return agent

    yield start
    for agent in agents:
        agent.stop()


def poll(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Call ``check`` until it returns something truthy (every 50 ms), or fail."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.05)
    return result


def stored(job: Job, key: str) -> bytes | None:
    async def go() -> bytes | None:
        store = open_store(job.store_url, s3_endpoint=job.s3_endpoint)
        try:
            return await get_bytes(store, key) if await store.size(key) is not None else None
        finally:
            await store.close()

    return asyncio.run(go())


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def write_rows(job: Job, n: int = 1000) -> None:
    job.inst.psql("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v text)", database=DB)
    job.inst.psql(f"INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, {n}) g "
                  f"ON CONFLICT DO NOTHING", database=DB)


def switch_wal(job: Job) -> str:
    """Finish the current segment; returns its name."""
    return job.inst.psql("SELECT pg_walfile_name(pg_switch_wal())")


# --- running -----------------------------------------------------------------------------


def test_healthz_is_200_while_postgres_accepts_connections(job, start_agent):
    agent = start_agent(job)
    status, body = agent.get("/healthz")
    assert status == 200 and body["status"] == "ok"


def test_status_reports_postgres_and_the_wal_position(job, start_agent):
    agent = start_agent(job)
    write_rows(job)
    status, body = agent.get("/status")
    assert status == 200
    assert body["postgres"]["running"] is True
    assert body["postgres"]["pid"] == read_postmaster(job.inst.datadir).pid
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", body["wal"]["current_lsn"])
    assert body["paused"] is False and body["last_snapshot"] is None


def test_switched_segments_are_uploaded_and_counted(job, start_agent):
    agent = start_agent(job)
    write_rows(job)
    segment = switch_wal(job)
    poll(lambda: stored(job, wal_key(JOB, segment)), f"{segment} in the store")
    _, text = agent.get("/metrics")
    assert metric(text, "jobmesh_agent_wal_segments_uploaded_total") >= 1
    _, body = poll(lambda: (s := agent.get("/status"))[1]["wal"]["spool_backlog"] == 0 and s,
                   "an empty spool")
    assert body["wal"]["last_archived"] == segment
    assert body["wal"]["archive_lag_seconds"] == 0


# --- pause -------------------------------------------------------------------------------


def test_pause_stops_postgres_and_answers_the_stored_manifest(job, start_agent):
    agent = start_agent(job)
    write_rows(job)
    pid = read_postmaster(job.inst.datadir).pid
    status, body = agent.post("/pause")
    assert status == 200, body
    manifest = Manifest.from_json(json.dumps(body).encode())
    assert manifest.kind == "pause" and manifest.job == JOB
    assert read_postmaster(job.inst.datadir) is None
    assert not alive(pid)
    assert Manifest.from_json(stored(job, snapshot_manifest_key(JOB, manifest.id))) == manifest
    assert agent.get("/healthz")[0] == 503
    _, st = agent.get("/status")
    assert st["paused"] is True and st["last_snapshot"]["id"] == manifest.id
    assert st["wal"]["spool_backlog"] == 0  # drained before the snapshot


def test_a_repeated_pause_answers_the_same_snapshot(job, start_agent):
    agent = start_agent(job)
    first = agent.post("/pause")
    second = agent.post("/pause")
    assert first[0] == second[0] == 200
    assert first[1]["id"] == second[1]["id"]


def test_a_paused_snapshot_restores_the_data(job, start_agent, pg_root):
    agent = start_agent(job)
    write_rows(job, 5000)
    expected = job.inst.psql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM items",
                             database=DB)
    status, body = agent.post("/pause")
    assert status == 200, body
    target = pg_root / f"restored-{os.urandom(3).hex()}"

    async def go() -> None:
        store = open_store(job.store_url, s3_endpoint=job.s3_endpoint)
        try:
            result = await restore(target, store, JOB)
            assert result.manifest.id == body["id"]
        finally:
            await store.close()

    asyncio.run(go())
    inst = Instance(target, port=free_port(), settings={"fsync": "off", "archive_mode": "off"})
    try:
        inst.start()
        assert inst.psql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM items",
                         database=DB) == expected
    finally:
        inst.stop_quietly()


def test_a_crash_is_recovered_from_the_base_backup_and_the_shipped_wal(job, start_agent,
                                                                      pg_root):
    agent = start_agent(job)
    write_rows(job, 1000)
    status, body = agent.post("/base-backup")
    assert status == 200, body
    job.inst.psql("INSERT INTO items SELECT g, 'after' FROM generate_series(1001, 3000) g",
                  database=DB)
    segment = switch_wal(job)
    poll(lambda: stored(job, wal_key(JOB, segment)), f"{segment} shipped")
    os.kill(read_postmaster(job.inst.datadir).pid, signal.SIGKILL)  # the pod is lost
    target = pg_root / f"recovered-{os.urandom(3).hex()}"

    async def go() -> None:
        store = open_store(job.store_url, s3_endpoint=job.s3_endpoint)
        try:
            result = await restore(target, store, JOB, s3_endpoint=job.s3_endpoint)
            assert result.manifest.id == body["id"] and result.recovery_configured
        finally:
            await store.close()

    asyncio.run(go())
    inst = Instance(target, port=free_port(), settings={"fsync": "off", "archive_mode": "off"})
    try:
        inst.start(timeout=120)  # returns once read-only connections are accepted
        poll(lambda: inst.psql("SELECT NOT pg_is_in_recovery()") == "t",
             "the end of WAL replay", timeout=120)
        assert inst.psql("SELECT count(*) FROM items", database=DB) == "3000", \
            inst.logfile.read_text()[-4000:]
    finally:
        inst.stop_quietly()


def test_pause_with_the_store_unreachable_is_500_and_keeps_pgdata_and_spool(job, start_agent):
    agent = start_agent(job, s3_endpoint=f"http://127.0.0.1:{free_port()}")
    write_rows(job)
    segment = switch_wal(job)
    poll(lambda: (job.spool / segment).exists(), f"{segment} in the spool")
    status, body = agent.post("/pause")
    assert status == 500
    assert set(body) == {"error"} and "\n" not in body["error"]
    assert body["error"].startswith("cannot upload the spooled WAL: "), body
    assert (job.spool / segment).exists()
    assert read_postmaster(job.inst.datadir) is None
    control, _ = check_stopped_pgdata(job.inst.datadir)  # a clean shutdown, nothing removed
    assert control.state == "shut down"
    agent.proc.kill()  # its final drain would only retry the unreachable store again
    agent.proc.wait()

    # Once the store is back, the same pause succeeds: the spool and PGDATA were kept.
    retry = start_agent(job)
    status, body = retry.post("/pause")
    assert status == 200, body
    assert stored(job, wal_key(JOB, segment)) is not None
    assert not (job.spool / segment).exists()
    job.inst.start()
    assert job.inst.psql("SELECT count(*) FROM items", database=DB) == "1000"


# --- other operations --------------------------------------------------------------------


def test_post_base_backup_returns_its_manifest(job, start_agent):
    agent = start_agent(job)
    write_rows(job)
    status, body = agent.post("/base-backup")
    assert status == 200, body
    assert body["kind"] == "base" and body["start_wal"] and body["end_wal"]
    assert stored(job, snapshot_manifest_key(JOB, body["id"])) is not None
    _, st = agent.get("/status")
    assert st["last_base_backup"]["id"] == body["id"]
    _, text = agent.get("/metrics")
    assert 'jobmesh_agent_snapshot_seconds_count{kind="base"} 1.0' in text


def test_post_dump_dumps_the_jobs_database(job, start_agent):
    agent = start_agent(job)
    write_rows(job, 1234)
    status, body = agent.post("/dump")
    assert status == 200, body
    assert body["kind"] == "dump" and body["extra"]["database"] == DB
    job.inst.psql("CREATE DATABASE copy")
    dsn = f"postgresql://postgres@/copy?host={quote(str(job.inst.socket_dir), safe='')}" \
          f"&port={job.inst.port}"

    async def go() -> Manifest:
        store = open_store(job.store_url, s3_endpoint=job.s3_endpoint)
        try:
            return await load(dsn, store, JOB, dump_id=body["id"])
        finally:
            await store.close()

    assert asyncio.run(go()).id == body["id"]
    assert job.inst.psql("SELECT count(*) FROM items", database="copy") == "1234"


def test_post_dump_of_another_database_and_of_a_missing_one(job, start_agent):
    agent = start_agent(job)
    status, body = agent.post("/dump?database=postgres")
    assert status == 200 and body["extra"]["database"] == "postgres"
    status, body = agent.post("/dump?database=nope")
    assert status == 500
    assert body["error"].startswith("pg_dump failed: ") and "nope" in body["error"]


def test_base_backups_follow_the_schedule(job, start_agent):
    agent = start_agent(job, "--base-backup-interval", "1")
    body = poll(lambda: agent.get("/status")[1]["last_base_backup"], "a scheduled base backup")
    assert stored(job, snapshot_manifest_key(JOB, body["id"])) is not None


def test_base_backup_while_paused_is_409(job, start_agent):
    agent = start_agent(job)
    assert agent.post("/pause")[0] == 200
    status, body = agent.post("/base-backup")
    assert status == 409 and "paused" in body["error"]


# --- lifecycle ---------------------------------------------------------------------------


def test_sigterm_drains_the_spool_and_exits_0(job, start_agent):
    agent = start_agent(job)
    write_rows(job)
    segment = switch_wal(job)
    poll(lambda: (job.spool / segment).exists() or stored(job, wal_key(JOB, segment)),
         f"{segment} archived")
    assert agent.stop() == 0
    assert stored(job, wal_key(JOB, segment)) is not None
    assert not (job.spool / segment).exists()


def test_the_agent_picks_up_the_latest_snapshot_from_the_store(job, start_agent):
    first = start_agent(job)
    status, body = first.post("/base-backup")
    assert status == 200, body
    first.stop()
    second = start_agent(job)
    snap = poll(lambda: second.get("/status")[1]["last_base_backup"], "history from the store")
    assert snap["id"] == body["id"]


def test_a_job_without_any_recovery_point_gets_a_base_backup_at_once(job, start_agent):
    # A new job: until its first base backup, a crash would lose everything it wrote.
    agent = start_agent(job, "--base-backup-interval", "3600")
    body = poll(lambda: agent.get("/status")[1]["last_base_backup"], "the first base backup")
    assert stored(job, snapshot_manifest_key(JOB, body["id"])) is not None
    assert agent.get("/status")[1]["next_base_backup_in"] > 3000


def test_a_job_with_a_pause_snapshot_waits_the_interval_for_its_base_backup(job, start_agent):
    first = start_agent(job)
    status, paused = first.post("/pause")
    assert status == 200, paused
    first.stop()
    job.inst.start()
    second = start_agent(job, "--base-backup-interval", "3600")
    snap = poll(lambda: second.get("/status")[1]["last_snapshot"], "history from the store")
    assert snap["id"] == paused["id"]
    _, st = second.get("/status")
    assert st["last_base_backup"] is None and st["next_base_backup_in"] > 3000


def test_bad_flags_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
                           "--pgdata",
                           str(tmp_path), "--store", f"file://{tmp_path}/s", "--job", JOB],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"jobmesh agent serve: {tmp_path} is not a PostgreSQL "
                                   "data directory")


# --- waiting for a process that is not our child -----------------------------------------


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A process that runs until its stdin closes (we leave reaping it to the finaliser)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
async def test_wait_for_exit_returns_when_the_process_ends(pidfd, child, monkeypatch):
    if not pidfd:
        def no_pidfd(_pid: int) -> int:
            raise OSError("no pidfd here")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    waiter = asyncio.create_task(wait_for_exit(child.pid, timeout=30))
    await asyncio.sleep(0)
    assert not waiter.done()
    child.stdin.close()  # the child exits, and stays a zombie: nobody reaps it yet
    await waiter
    assert not alive(child.pid)


async def test_wait_for_exit_times_out_while_the_process_runs(child):
    with pytest.raises(TimeoutError):
        await wait_for_exit(child.pid, timeout=0.2)
    assert alive(child.pid)


def test_archive_timeout_ships_an_unfinished_segment_soon_after_start(pg_root, s3_server,
                                                                     start_agent):
    # PostgreSQL 15 ignores archive_timeout until a reload after start: the agent reloads.
    base = pg_root / f"serve-at-{os.urandom(3).hex()}"
    base.mkdir()
    init_pgdata(base / "pgdata", JOB, spool=base / "pgdata.spool", archive_timeout=1)
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    inst.start()
    bucket = s3_server.create_bucket(f"serve-{os.urandom(4).hex()}")
    job = Job(inst, base / "pgdata.spool", f"s3://{bucket}/jobs", s3_server.endpoint)
    try:
        start_agent(job)
        write_rows(job, 10)
        segment = inst.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        # No pg_switch_wal: only archive_timeout can finish this segment (else 5 min).
        poll(lambda: stored(job, wal_key(JOB, segment)), f"{segment} in the store", timeout=60)
    finally:
        inst.stop_quietly()
