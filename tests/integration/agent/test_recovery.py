"""A job's life on disk: init, base backups, and recovery after a crash or to a point in time.

Everything is real: ``init_pgdata`` clusters archiving into a spool, the
``Archiver`` shipping to a ``file://`` store and to moto's S3 server, the
postmaster killed with SIGKILL under write load, and a restore that starts
PostgreSQL with ``restore_command`` = ``agent wal-fetch``.

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures; its helpers live in tests/support.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from jobmesh.agent.basebackup import take_base_backup
from jobmesh.agent.cas.objects import object_key
from jobmesh.agent.errors import AgentError
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.manifest import Manifest, job_prefix, snapshot_manifest_key, wal_key
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.agent.restore import restore
from jobmesh.agent.snapshot import take_snapshot
from jobmesh.agent.store import Store, get_bytes
from jobmesh.agent.wal import Archiver
from jobmesh.agent.walnames import parse_lsn, segment_of
from tests.support.machine import working_in
from tests.support.snapshot_objects import read_snapshot_file
from tests.support.waiting import until

ARCHIVE_TIMEOUT = 1


@dataclass
class Job:
    id: str
    base: Path
    inst: Instance

    @property
    def pgdata(self) -> Path:
        return self.inst.datadir

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    @property
    def dsn(self) -> str:
        return (f"postgresql://postgres@/job_{self.id}"
                f"?host={self.inst.socket_dir}&port={self.inst.port}")

    async def connect(self) -> asyncpg.Connection:
        return await connect(self.inst, f"job_{self.id}")


async def connect(inst: Instance, db: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=str(inst.socket_dir), port=inst.port, user="postgres",
                                 database=db)


def start_archiving(inst: Instance) -> None:
    """Start Postgres so that archive_timeout works from the first second.

    PostgreSQL 15's checkpointer first goes to sleep while the startup process
    still runs, when it ignores archive_timeout, for a whole checkpoint_timeout
    (5 min): a reload wakes it to recompute its timeout.
    """
    inst.start()
    inst.psql("select pg_reload_conf()")


@pytest.fixture
def new_job(pg_root: Path) -> Iterator[Callable[..., Job]]:
    """Initialise and start jobs (``init_pgdata``); all are stopped at the end."""
    started: list[Instance] = []

    def make(job_id: str, *, archive_timeout: int = ARCHIVE_TIMEOUT) -> Job:
        base = pg_root / f"{job_id}-{os.urandom(3).hex()}"
        init_pgdata(base / "pgdata", job_id, spool=base / "spool",
                    archive_timeout=archive_timeout)
        inst = Instance(base / "pgdata", port=free_port())
        started.append(inst)
        start_archiving(inst)
        return Job(job_id, base, inst)

    yield make
    for inst in started:
        inst.stop_quietly()


@contextlib.asynccontextmanager
async def archiving(job: Job, store: Store) -> AsyncIterator[Archiver]:
    """An Archiver running beside the job, drained once it stops."""
    archiver = Archiver(store, job.id, job.spool)
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop, interval=0.05))
    try:
        yield archiver
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


# --- restore (base backup + archived WAL) -------------------------------------------------


async def restore_base_backup(store: Store, manifest: Manifest, dest: Path, *,
                              target_time: str | None = None) -> Instance:
    """``agent.restore.restore`` of this base backup into ``dest``, then start it.

    Returns once recovery has finished and the server accepts writes. Archiving
    is off for the copy: the original job may still archive into the same spool.
    """
    result = await restore(dest, store, manifest.job, snapshot_id=manifest.id,
                           target_time=target_time)
    assert result.manifest == manifest and result.recovery_configured
    inst = Instance(dest, port=free_port(), settings={"archive_mode": "off"})
    try:
        inst.start(timeout=300)
        conn = await connect(inst, "postgres")
        try:
            async def promoted() -> bool:
                return not await conn.fetchval("select pg_is_in_recovery()")

            await until(promoted, f"recovery of {dest} to finish", timeout=300)
        finally:
            await conn.close()
    except Exception as exc:
        inst.stop_quietly()
        log = inst.logfile.read_text() if inst.logfile.exists() else "(no log)"
        raise AssertionError(f"recovery failed: {exc}\n{log[-3000:]}") from exc
    return inst


# --- init -----------------------------------------------------------------------------------


async def test_init_creates_an_archiving_checksummed_cluster(new_job: Callable[..., Job]) -> None:
    job = new_job("initial")
    conn = await job.connect()
    try:
        assert await conn.fetchval("show data_checksums") == "on"
        assert await conn.fetchval("show wal_level") == "replica"
        assert await conn.fetchval("show archive_mode") == "on"
        assert await conn.fetchval("show archive_library") == "basic_archive"
        assert await conn.fetchval("show basic_archive.archive_directory") == str(job.spool)
        assert await conn.fetchval("show archive_timeout") == f"{ARCHIVE_TIMEOUT}s"
        owner = await conn.fetchval("select pg_get_userbyid(datdba) from pg_database "
                                    "where datname = current_database()")
        assert owner == "job_owner"
        logins = dict(await conn.fetch("select rolname, rolcanlogin from pg_roles "
                                       "where rolname in ('job_owner', 'job_reader')"))
        assert logins == {"job_owner": False, "job_reader": False}
    finally:
        await conn.close()
    assert job.spool.stat().st_uid == job.pgdata.stat().st_uid  # postgres may write there


async def test_the_reader_sees_every_table_the_owner_creates_and_writes_none(
        new_job: Callable[..., Job]) -> None:
    job = new_job("roles")
    conn = await job.connect()
    try:
        await conn.execute("set role job_owner; create table later (n int); "
                           "insert into later values (1); reset role")
        await conn.execute("set role job_reader")
        assert await conn.fetchval("select count(*) from later") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("insert into later values (2)")
    finally:
        await conn.close()


def test_init_refuses_a_non_empty_pgdata(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "precious").write_text("data")
    with pytest.raises(AgentError, match="not empty"):
        init_pgdata(pgdata, "x", spool=tmp_path / "spool")
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "agent", "init", "--pgdata",
                           str(pgdata), "--job", "x"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"jobmesh agent init: {pgdata} is not empty: refusing to initialise over it"]
    assert (pgdata / "precious").read_text() == "data"


# --- base backup ----------------------------------------------------------------------------


async def test_base_backup_manifest_names_its_wal_and_comes_last(
        new_job: Callable[..., Job], store: Store) -> None:
    job = new_job("based")
    manifest = await take_base_backup(job.dsn, job.pgdata, store, job.id)
    assert manifest.kind == "base"
    assert manifest.pg_version == "15"
    assert manifest.timeline == 1
    conn = await job.connect()
    try:
        assert manifest.system_identifier == await conn.fetchval(
            "select system_identifier::text from pg_control_system()")
        assert manifest.start_wal == await conn.fetchval("select pg_walfile_name($1::text::pg_lsn)",
                                                         manifest.start_lsn)
    finally:
        await conn.close()
    assert parse_lsn(manifest.start_lsn) < parse_lsn(manifest.end_lsn)
    assert segment_of(1, parse_lsn(manifest.start_lsn)).name == manifest.start_wal
    # every segment the restore needs is stored before the manifest
    for name in (manifest.start_wal, manifest.end_wal):
        assert await store.size(wal_key(job.id, name)) is not None
    stored = Manifest.from_json(await get_bytes(store, snapshot_manifest_key(job.id,
                                                                             manifest.id)))
    assert stored == manifest
    # the objects list only the backup label; PGDATA is files of store-wide objects
    assert [o.key for o in manifest.objects] == [manifest.extra["backup_label"]]
    for entry in manifest.objects:
        body = await get_bytes(store, job_prefix(job.id) + entry.key)
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry.size, entry.sha256)
    label = await get_bytes(store, job_prefix(job.id) + manifest.extra["backup_label"])
    assert f"(file {manifest.start_wal})" in label.decode()
    for name in manifest.object_names():
        assert await store.size(object_key(name)) is not None
    assert await read_snapshot_file(store, manifest, "PG_VERSION") == b"15\n"

    names = {f.path for f in manifest.files} | {d.path for d in manifest.dirs}
    assert {"PG_VERSION", "global/pg_control", "pg_wal", "pg_wal/archive_status"} <= names
    assert not {"postmaster.pid", "postmaster.opts", "backup_label"} & names
    assert not [n for n in names if n.startswith(("pg_wal/0", "pg_replslot/", "pg_stat_tmp/"))]


async def test_base_backup_refuses_a_server_without_archiving(
        pg: Instance, store: Store) -> None:
    dsn = f"postgresql://postgres@/job_alpha?host={pg.socket_dir}&port={pg.port}"
    with pytest.raises(AgentError, match="archive_mode is off"):
        await take_base_backup(dsn, pg.datadir, store, "plain")
    assert await store.list("plain/") == []


async def test_base_backup_refuses_a_pgdata_the_server_does_not_run_on(
        new_job: Callable[..., Job], store: Store) -> None:
    one, other = new_job("one"), new_job("other")
    with pytest.raises(AgentError, match="does not run on"):
        await take_base_backup(one.dsn, other.pgdata, store, one.id)
    assert await store.list(f"{one.id}/snapshots/") == []


def test_cli_base_backup_prints_the_id_of_a_stored_backup(
        new_job: Callable[..., Job], pg_root: Path) -> None:
    job = new_job("clibb")
    root = pg_root / f"store-{os.urandom(4).hex()}"
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "agent", "base-backup", "--dsn",
                           job.dsn, "--pgdata", str(job.pgdata), "--store", f"file://{root}",
                           "--job", job.id], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip()
    manifest = Manifest.from_json((root / snapshot_manifest_key(job.id, sid)).read_bytes())
    assert (manifest.kind, manifest.id) == ("base", sid)


# --- crash recovery -------------------------------------------------------------------------


@pytest.mark.timeout(300)  # 17 s on the file store; 70-120 s on moto under the suite's load
async def test_kill_9_under_write_load_loses_at_most_the_unarchived_tail(
        new_job: Callable[..., Job], store: Store) -> None:
    job = new_job("crash")
    committed: list[tuple[float, int]] = []  # (monotonic time acknowledged, row number)
    conn = await job.connect()
    await conn.execute("create table t (n bigint primary key, at timestamptz default now())")

    async def writer() -> None:
        n = 0
        with contextlib.suppress(Exception):  # the server dies under us: that is the point
            while True:
                await conn.execute("insert into t (n) values ($1)", n + 1)
                n += 1
                committed.append((time.monotonic(), n))

    async with archiving(job, store) as archiver:
        writing = asyncio.create_task(writer())

        async def some_rows() -> bool:
            return len(committed) >= 200

        await until(some_rows, "the writer to commit 200 rows")
        manifest = await take_base_backup(job.dsn, job.pgdata, store, job.id)
        rows_in_backup = committed[-1][1]
        # Keep writing until more segments went through the whole pipeline.
        await asyncio.wait_for(archiver.wait_uploaded(archiver.uploaded + 2), 120)
        # Segments are uploaded right after a switch: crash mid-way to the next one
        # instead, when the tail at risk is at its usual size.
        shipped_at = time.monotonic()

        async def mid_segment() -> bool:
            return committed[-1][0] >= shipped_at + 0.7 * ARCHIVE_TIMEOUT

        await until(mid_segment, "the writer to go on into the next segment")
        # The pod is lost: SIGKILL to the postmaster, then at once to all its children,
        # so none of them gets to switch or archive one more segment.
        postmaster = int((job.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        killed_at = time.monotonic()
        last_acknowledged = committed[-1][1]
        for pid in working_in(job.pgdata):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(writing, 60)

        async def all_gone() -> bool:
            return not working_in(job.pgdata)

        await until(all_gone, "the crashed server's processes to exit")
    await conn.close()
    await archiver.drain()  # what the agent does when it comes back
    assert not [p for p in job.spool.iterdir() if not p.name.startswith("archtemp")]

    restored = await restore_base_backup(store, manifest, job.base / "restored")
    try:
        rconn = await connect(restored, f"job_{job.id}")
        try:
            count, highest = await rconn.fetchrow("select count(*), coalesce(max(n), 0) from t")
            # nothing restored that a client was not told about, and no holes
            assert count == highest
            assert highest <= last_acknowledged + 1  # +1: committed, ack lost in the kill
            await rconn.execute("insert into t (n) values ($1)", highest + 1)  # writable
        finally:
            await rconn.close()
    finally:
        restored.stop_quietly()
    lost = max(last_acknowledged - highest, 0)
    lost_since = next((t for t, n in committed if n > highest), killed_at)
    bound = ARCHIVE_TIMEOUT + 2.0  # archive_timeout, plus the checkpointer's whole seconds
    must_have = max((n for t, n in committed if t <= killed_at - bound), default=0)
    print(f"\ncrash ({store.url.split(':')[0]}): {last_acknowledged} rows acknowledged, "
          f"{rows_in_backup} in the base backup, {highest} restored, {lost} lost "
          f"(the last {killed_at - lost_since:.2f} s before kill -9)")
    assert highest > rows_in_backup  # WAL replay happened, not just the base backup
    assert highest >= must_have, (
        f"lost rows committed more than {bound} s before the crash: "
        f"restored {highest}, but {must_have} were committed by then")


# --- point-in-time recovery -----------------------------------------------------------------


async def test_restore_to_a_time_between_two_batches_keeps_only_the_first(
        new_job: Callable[..., Job], store: Store) -> None:
    job = new_job("pitr", archive_timeout=60)
    conn = await job.connect()
    try:
        await conn.execute("create table batches (batch text, n int)")
        manifest = await take_base_backup(job.dsn, job.pgdata, store, job.id)
        await conn.execute("insert into batches select 'A', g from generate_series(1, 100) g")
        target = await conn.fetchval("select now()::text")  # a transaction after A's commit

        async def after_target() -> bool:
            return await conn.fetchval("select clock_timestamp() > $1::text::timestamptz", target)

        await until(after_target, "the server clock to pass the target")
        await conn.execute("insert into batches select 'B', g from generate_series(1, 50) g")
        last = await conn.fetchval("select pg_walfile_name(pg_switch_wal())")

        async def archived() -> bool:  # into the spool, by Postgres's archiver
            done = await conn.fetchval("select last_archived_wal from pg_stat_archiver")
            return done is not None and done >= last

        await until(archived, f"Postgres to archive {last}")
    finally:
        await conn.close()
    await Archiver(store, job.id, job.spool).drain()

    restored = await restore_base_backup(store, manifest, job.base / "restored",
                                         target_time=target)
    try:
        rconn = await connect(restored, f"job_{job.id}")
        try:
            counts = dict(await rconn.fetch("select batch, count(*) from batches group by 1"))
        finally:
            await rconn.close()
    finally:
        restored.stop_quietly()
    assert counts == {"A": 100}


# --- pause snapshot + WAL archived after the resume -----------------------------------------


async def _pause(job: Job, store: Store) -> Manifest:
    """What ``POST /pause`` does: clean stop, drain the spool, pause snapshot."""
    job.inst.stop()
    await Archiver(store, job.id, job.spool).drain()
    return await take_snapshot(job.pgdata, store, job.id)


async def test_plain_pause_snapshot_restores_without_recovery(
        new_job: Callable[..., Job], store: Store) -> None:
    job = new_job("pz", archive_timeout=60)
    await _pause(job, store)
    result = await restore(job.base / "restored", store, job.id)
    assert result.manifest.kind == "pause" and not result.recovery_configured


async def test_crash_after_resume_replays_the_wal_archived_since_the_pause(
        new_job: Callable[..., Job], store: Store) -> None:
    job = new_job("pr", archive_timeout=60)
    conn = await job.connect()
    await conn.execute("create table t as select 1 as n")
    await conn.close()
    await _pause(job, store)
    start_archiving(job.inst)  # resume on the same PGDATA
    conn = await job.connect()
    try:
        await conn.execute("insert into t select g from generate_series(2, 1000) g")
        last = await conn.fetchval("select pg_walfile_name(pg_switch_wal())")

        async def archived() -> bool:
            done = await conn.fetchval("select last_archived_wal from pg_stat_archiver")
            return done is not None and done >= last

        await until(archived, f"Postgres to archive {last}")
    finally:
        await conn.close()
    await Archiver(store, job.id, job.spool).drain()
    for pid in working_in(job.pgdata):  # the job is lost, as with a vanished pod
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    result = await restore(job.base / "restored", store, job.id)
    assert result.manifest.kind == "pause" and result.recovery_configured
    restored = Instance(job.base / "restored", port=free_port(), settings={"archive_mode": "off"})
    try:
        restored.start(timeout=300)
        rconn = await connect(restored, f"job_{job.id}")
        try:
            async def promoted() -> bool:
                return not await rconn.fetchval("select pg_is_in_recovery()")

            await until(promoted, "recovery to finish")
            assert await rconn.fetchval("select count(*) from t") == 1000
        finally:
            await rconn.close()
    finally:
        restored.stop_quietly()
