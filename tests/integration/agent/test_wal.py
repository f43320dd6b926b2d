"""WAL shipping against a real PostgreSQL archiving into a spool, and real stores.

Segments come from a live server (``agent init`` settings, ``pg_switch_wal``),
go through ``push_segment`` / the ``Archiver`` into a ``file://`` store and
moto's S3 server, and come back through ``fetch_segment`` and the CLI.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from jobmesh.agent.errors import AgentError
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.manifest import history_key, wal_key
from jobmesh.agent.metrics import AgentMetrics
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.agent.store import NotFound, Store, StoreError, get_bytes, open_store, put_bytes
from jobmesh.agent.wal import Archiver, fetch_segment, push_segment
from jobmesh.agent.walnames import SEGMENT_SIZE, is_segment, next_segment
from tests.support.waiting import until

JOB = "walt"


@pytest.fixture(scope="module")
def server(pg_root: Path) -> Iterator[Instance]:
    """A job initialised by ``init_pgdata``, running, archiving into its spool."""
    base = pg_root / f"wal-tests-{os.urandom(3).hex()}"  # a module fixture may be set up twice
    base.mkdir()
    init_pgdata(base / "pgdata", JOB, spool=base / "spool", archive_timeout=0)
    for leftover in (base / "spool").iterdir():  # from init itself; tests count segments
        leftover.unlink()
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    inst.start()
    yield inst
    inst.stop_quietly()


def start_archiving(inst: Instance) -> None:
    """Start Postgres so that archive_timeout works from the first second.

    PostgreSQL 15's checkpointer first goes to sleep while the startup process
    still runs, when it ignores archive_timeout, for a whole checkpoint_timeout
    (5 min): a reload wakes it to recompute its timeout.
    """
    inst.start()
    inst.psql("select pg_reload_conf()")


def spool_of(inst: Instance) -> Path:
    return inst.datadir.parent / "spool"


async def connect(inst: Instance, db: str = f"job_{JOB}") -> asyncpg.Connection:
    return await asyncpg.connect(host=str(inst.socket_dir), port=inst.port, user="postgres",
                                 database=db)


async def archive_segments(inst: Instance, n: int, *, rows: int = 2000) -> list[Path]:
    """Write some WAL, switch segments ``n`` times, and return every segment Postgres has
    archived into the spool up to the last switch (more than ``n`` when rows overflow a
    segment), once they are all there."""
    conn = await connect(inst)
    names = []
    try:
        await conn.execute("create table if not exists filler (id bigserial, v text)")
        for _ in range(n):
            await conn.execute("insert into filler (v) select md5(g::text) "
                               "from generate_series(1, $1) g", rows)
            lsn = await conn.fetchval("select pg_switch_wal()")
            names.append(await conn.fetchval("select pg_walfile_name($1)", lsn))
    finally:
        await conn.close()
    spool = spool_of(inst)

    async def archived() -> bool:
        return all((spool / name).exists() for name in names)

    await until(archived, f"Postgres to archive {names}")
    return sorted(p for p in spool.iterdir() if is_segment(p.name) and p.name <= names[-1])


async def take_segments(inst: Instance, dest: Path, n: int, *, rows: int = 2000) -> list[Path]:
    """Fresh real segments (``n`` switches' worth), moved out of the server's spool."""
    os.makedirs(dest, exist_ok=True)
    return [Path(shutil.move(path, dest / path.name))
            for path in await archive_segments(inst, n, rows=rows)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- push and fetch ---------------------------------------------------------------------


async def test_segment_round_trips_through_the_store(server: Instance, store: Store,
                                                     tmp_path: Path) -> None:
    [seg] = await take_segments(server, tmp_path / "spool", 1)
    assert await push_segment(store, JOB, seg) == "uploaded"
    stored = await store.size(wal_key(JOB, seg.name))
    assert stored is not None and stored < SEGMENT_SIZE // 4  # compressed
    dest = tmp_path / "RECOVERYXLOG"
    await fetch_segment(store, JOB, seg.name, dest)
    assert sha(dest) == sha(seg)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no tmp file left


async def test_pushing_the_same_segment_twice_succeeds(server: Instance, store: Store,
                                                       tmp_path: Path) -> None:
    [seg] = await take_segments(server, tmp_path / "spool", 1)
    assert await push_segment(store, JOB, seg) == "uploaded"
    before = await get_bytes(store, wal_key(JOB, seg.name))
    assert await push_segment(store, JOB, seg) == "exists"
    assert await get_bytes(store, wal_key(JOB, seg.name)) == before


async def test_different_bytes_under_an_archived_name_are_refused(
        server: Instance, store: Store, tmp_path: Path) -> None:
    [seg] = await take_segments(server, tmp_path / "spool", 1)
    await push_segment(store, JOB, seg)
    before = await get_bytes(store, wal_key(JOB, seg.name))
    impostor = tmp_path / "other" / seg.name
    impostor.parent.mkdir()
    data = bytearray(seg.read_bytes())
    data[SEGMENT_SIZE // 2] ^= 0xFF
    impostor.write_bytes(bytes(data))
    with pytest.raises(AgentError, match="different content"):
        await push_segment(store, JOB, impostor)
    assert await get_bytes(store, wal_key(JOB, seg.name)) == before  # never overwritten


async def test_history_files_go_beside_the_segments(store: Store, tmp_path: Path) -> None:
    hist = tmp_path / "00000002.history"
    hist.write_text("1\t0/3000000\tno recovery target specified\n")
    assert await push_segment(store, JOB, hist) == "uploaded"
    assert await store.size(history_key(JOB, hist.name)) is not None
    await fetch_segment(store, JOB, hist.name, tmp_path / "RECOVERYHISTORY")
    assert (tmp_path / "RECOVERYHISTORY").read_text() == hist.read_text()


async def test_fetching_an_unarchived_segment_raises_not_found(store: Store,
                                                               tmp_path: Path) -> None:
    dest = tmp_path / "RECOVERYXLOG"
    with pytest.raises(NotFound):
        await fetch_segment(store, JOB, "000000010000000000000042", dest)
    assert os.listdir(tmp_path) == []


async def test_a_truncated_segment_is_not_pushed(store: Store, tmp_path: Path) -> None:
    seg = tmp_path / "000000010000000000000007"
    seg.write_bytes(b"\0" * 4096)
    with pytest.raises(AgentError, match="not a whole"):
        await push_segment(store, JOB, seg)
    assert await store.size(wal_key(JOB, seg.name)) is None


async def test_a_file_that_is_not_wal_is_not_pushed(store: Store, tmp_path: Path) -> None:
    junk = tmp_path / "archtemp.000000010000000000000001.123.456"
    junk.write_bytes(b"x")
    with pytest.raises(AgentError, match="not a WAL file name"):
        await push_segment(store, JOB, junk)


async def test_a_corrupt_stored_segment_fails_the_fetch(store: Store, tmp_path: Path) -> None:
    name = "000000010000000000000009"
    await put_bytes(store, wal_key(JOB, name), b"\x28\xb5\x2f\xfd garbage")
    dest = tmp_path / "RECOVERYXLOG"
    with pytest.raises(AgentError):
        await fetch_segment(store, JOB, name, dest)
    assert not dest.exists()


# --- the archiver -----------------------------------------------------------------------


async def test_drain_uploads_the_spool_and_empties_it(server: Instance, store: Store,
                                                      tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    segs = await take_segments(server, spool, 3)
    (spool / "archtemp.000000010000000000000099.1.2").write_bytes(b"partial copy")
    digests = {p.name: sha(p) for p in segs}
    metrics = AgentMetrics()
    archiver = Archiver(store, JOB, spool, metrics=metrics)
    assert await archiver.drain() == 3
    assert sorted(p.name for p in spool.iterdir()) == ["archtemp.000000010000000000000099.1.2"]
    for name, digest in digests.items():
        dest = tmp_path / name
        await fetch_segment(store, JOB, name, dest)
        assert sha(dest) == digest
    assert metrics.wal_segments._value.get() == 3
    assert metrics.wal_bytes._value.get() > 0
    assert metrics.archive_lag._value.get() == 0


async def test_drain_keeps_the_spool_when_the_store_fails(
        server: Instance, s3_server: object, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    segs = await take_segments(server, spool, 2)
    broken = open_store("s3://no-such-bucket/x", s3_endpoint=s3_server.endpoint)  # type: ignore[attr-defined]
    metrics = AgentMetrics()
    try:
        with pytest.raises(StoreError):
            await Archiver(broken, JOB, spool, metrics=metrics).drain()
    finally:
        await broken.close()
    assert sorted(spool.iterdir()) == sorted(segs)
    assert metrics.failures.labels("wal_push")._value.get() == 2


async def test_drain_leaves_a_conflicting_segment_in_the_spool(
        server: Instance, store: Store, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    [seg] = await take_segments(server, spool, 1)
    await put_bytes(store, wal_key(JOB, seg.name), b"\x28\xb5\x2f\xfd\x20\x01\x09\x00\x00x")
    with pytest.raises(AgentError):
        await Archiver(store, JOB, spool).drain()
    assert seg.exists()


async def test_drain_beside_a_running_archiver_uploads_each_segment_once(
        server: Instance, store: Store, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    segs = await take_segments(server, spool, 6)
    metrics = AgentMetrics()
    archiver = Archiver(store, JOB, spool, metrics=metrics, parallel=16)
    stop = asyncio.Event()
    runner = asyncio.create_task(archiver.run(stop, interval=0.01))
    try:
        await asyncio.gather(archiver.drain(), archiver.drain())
        assert os.listdir(spool) == []  # drain returned: everything is in the store
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
    assert metrics.wal_segments._value.get() == len(segs)
    assert archiver.uploaded == len(segs)


async def test_archiver_ships_segments_as_postgres_archives_them(
        pg_root: Path, store: Store, tmp_path: Path) -> None:
    base = pg_root / f"run-{os.urandom(3).hex()}"
    init_pgdata(base / "pgdata", "runner", spool=base / "spool", archive_timeout=1)
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    start_archiving(inst)
    metrics = AgentMetrics()
    archiver = Archiver(store, "runner", base / "spool", metrics=metrics)
    stop = asyncio.Event()
    runner = asyncio.create_task(archiver.run(stop, interval=0.05))
    try:
        conn = await connect(inst, "job_runner")
        await conn.execute("create table t (n int)")
        switched = await conn.fetchval("select pg_walfile_name(pg_switch_wal())")
        # archive_timeout = 1 s switches the next segment without our help
        await conn.execute("insert into t values (1)")
        await conn.close()

        async def shipped() -> bool:
            return await store.size(wal_key("runner", next_segment(switched))) is not None

        await until(shipped, "the timed-out segment to reach the store")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
        inst.stop_quietly()
    assert await store.size(wal_key("runner", switched)) is not None
    assert await store.size(wal_key("runner", next_segment(switched))) is not None
    assert metrics.wal_segments._value.get() >= 2
    assert metrics.wal_push_seconds._sum.get() > 0
    assert not any(is_segment(p.name) and p.name <= next_segment(switched)
                   for p in (base / "spool").iterdir())


async def test_archive_lag_is_the_age_of_the_oldest_waiting_segment(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    seg = spool / "000000010000000000000003"
    seg.write_bytes(b"\0" * SEGMENT_SIZE)
    an_hour_ago = time.time() - 3600
    os.utime(seg, (an_hour_ago, an_hour_ago))
    broken = open_store(f"file://{tmp_path / 'store'}")
    (tmp_path / "store").write_text("not a directory")  # every upload fails
    metrics = AgentMetrics()
    archiver = Archiver(broken, JOB, spool, metrics=metrics)
    stop = asyncio.Event()
    runner = asyncio.create_task(archiver.run(stop, interval=0.01))

    async def failed_once() -> bool:
        return metrics.failures.labels("wal_push")._value.get() >= 1

    await until(failed_once, "a failed upload")
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert 3590 < metrics.archive_lag._value.get() < 3700
    assert seg.exists()


# --- CLI --------------------------------------------------------------------------------


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobmesh", "agent", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


async def test_cli_push_then_fetch(server: Instance, pg_root: Path, tmp_path: Path) -> None:
    [seg] = await take_segments(server, tmp_path / "spool", 1)
    url = f"file://{pg_root / ('cli-' + os.urandom(3).hex())}"
    pushed = agent_cli("wal-push", "--store", url, "--job", JOB, str(seg))
    assert pushed.returncode == 0, pushed.stderr
    again = agent_cli("wal-push", "--store", url, "--job", JOB, str(seg))
    assert again.returncode == 0, again.stderr
    fetched = agent_cli("wal-fetch", "--store", url, "--job", JOB, seg.name,
                        str(tmp_path / "got"))
    assert fetched.returncode == 0, fetched.stderr
    assert sha(tmp_path / "got") == sha(seg)


def test_cli_fetch_of_a_missing_segment_exits_1_with_one_line(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'empty'}"
    proc = agent_cli("wal-fetch", "--store", url, "--job", JOB, "000000010000000000000005",
                     str(tmp_path / "RECOVERYXLOG"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "wal-fetch: 000000010000000000000005 is not archived"]
    assert not (tmp_path / "RECOVERYXLOG").exists()


def test_cli_push_of_a_conflicting_segment_exits_1_with_one_line(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    name = "000000010000000000000005"
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    for path, fill in ((a, b"\1"), (b, b"\2")):
        path.parent.mkdir()
        path.write_bytes(fill * SEGMENT_SIZE)
    assert agent_cli("wal-push", "--store", f"file://{store_dir}", "--job", JOB,
                     str(a)).returncode == 0
    proc = agent_cli("wal-push", "--store", f"file://{store_dir}", "--job", JOB, str(b))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "different content" in lines[0], proc.stderr


# --- latency ----------------------------------------------------------------------------


@pytest.mark.soak
async def test_push_latency_per_segment(server: Instance, store: Store, tmp_path: Path) -> None:
    """p50/p99 of compress+upload for real segments (printed; run with -s to see)."""
    segs = []
    while len(segs) < 30:  # full segments (~110k rows each), in batches
        segs += await take_segments(server, tmp_path / "spool", 3, rows=110_000)
    metrics = AgentMetrics()
    times = []
    for seg in segs:
        started = time.perf_counter()
        assert await push_segment(store, JOB, seg, metrics=metrics) == "uploaded"
        times.append(time.perf_counter() - started)
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    ratio = len(segs) * SEGMENT_SIZE / metrics.wal_bytes._value.get()
    print(f"\nWAL push {store.url.split(':')[0]}: n={len(times)} p50={p50 * 1000:.1f} ms "
          f"p99={p99 * 1000:.1f} ms max={times[-1] * 1000:.1f} ms compression x{ratio:.1f}")
    assert p50 < 5.0  # generous: catches a push that hangs or retries, not a slow machine
