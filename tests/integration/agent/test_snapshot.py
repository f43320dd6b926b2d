"""Pause snapshots: their objects and manifest, the tar.zst stream (format 1, still restored),
the stopped-PGDATA checks, and an agent killed mid-upload.

Everything is real: PostgreSQL 15 clusters, the file:// store in a temp
directory and moto's S3 API server, and ``jobmesh agent snapshot`` run as a
subprocess where the command line or a kill -9 is what is being tested.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zstandard

from jobmesh.agent.cas.objects import CHUNK_SIZE, OBJECTS_PREFIX, object_key
from jobmesh.agent.errors import AgentError
from jobmesh.agent.manifest import (
    Manifest,
    job_prefix,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from jobmesh.agent.metrics import AgentMetrics
from jobmesh.agent.postgres import Instance, bin_dir, run_pg
from jobmesh.agent.restore import restore
from jobmesh.agent.snapshot import parse_controldata, read_controldata, take_snapshot
from jobmesh.agent.store import Store, get_bytes
from jobmesh.agent.tarstream import extract_tar_zst, tar_zst_chunks
from jobmesh.agent.walnames import next_segment
from tests.support.clusters import agent, checksums, cluster, fill, start_restored, unique
from tests.support.postgres import PgFactory
from tests.support.snapshot_objects import stored_object_names
from tests.support.stores import StoreSpec


async def stored_ids(store: Store, job: str) -> list[str]:
    keys = [o.key for o in await store.list(job_prefix(job))]
    return snapshot_ids_with_manifest(keys, job)


# --- tarstream ----------------------------------------------------------------------------


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in stream])


async def chunks_of(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    return out


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "base" / "1").mkdir(parents=True)
    (src / "pg_wal" / "archive_status").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "base" / "1" / "1259").write_bytes(os.urandom(3 << 20))
    (src / "PG_VERSION").write_text("15\n")
    (src / "compressible").write_bytes(b"abc" * 1_000_000)
    return src


async def test_tar_round_trip_keeps_files_dirs_and_adds_extra_files(
        sample_dir: Path, tmp_path: Path) -> None:
    stream = tar_zst_chunks(sample_dir, extra={"backup_label": b"START WAL LOCATION\n"},
                            exclude=lambda rel: rel == "empty")
    data = await collect(stream)
    dest = tmp_path / "dest"
    written = await extract_tar_zst(chunks_of(data), dest)

    expected = tree(sample_dir)
    del expected["empty"]
    expected["backup_label"] = b"START WAL LOCATION\n"
    assert tree(dest) == expected
    assert written == sum(len(v) for v in expected.values() if v is not None)
    assert stream.uncompressed_size > written > len(data)  # tar headers; zstd compressed
    assert dest.stat().st_mode & 0o777 == 0o700


async def test_tar_stream_is_chunked_not_one_blob(sample_dir: Path) -> None:
    (sample_dir / "big").write_bytes(os.urandom(6 << 20))
    sizes = [len(c) async for c in tar_zst_chunks(sample_dir)]
    assert len(sizes) >= 6
    assert max(sizes) <= 4 << 20


async def test_a_file_removed_during_the_walk_is_skipped(sample_dir: Path, tmp_path: Path) -> None:
    victim = sample_dir / "pg_wal" / "000000010000000000000002"
    victim.write_bytes(b"x" * 100)
    (sample_dir / "pg_wal" / "000000010000000000000001").write_bytes(b"y" * 100)

    def exclude(rel: str) -> bool:
        # pg_wal is listed by now; Postgres recycles the next segment meanwhile
        if rel == "pg_wal/000000010000000000000001":
            victim.unlink()
        return False

    stream = tar_zst_chunks(sample_dir, exclude=exclude)
    data = await collect(stream)
    await extract_tar_zst(chunks_of(data), tmp_path / "dest")
    assert sorted(p.name for p in (tmp_path / "dest" / "pg_wal").iterdir()) == [
        "000000010000000000000001", "archive_status"]
    assert stream.skipped == ["pg_wal/000000010000000000000002"]


async def test_closing_the_stream_early_stops_the_worker(sample_dir: Path) -> None:
    (sample_dir / "big").write_bytes(os.urandom(20 << 20))
    before = {t.ident for t in threading.enumerate()}
    stream = tar_zst_chunks(sample_dir)
    await anext(stream)
    await stream.aclose()
    assert [t for t in threading.enumerate() if t.name == "tar-zst" and t.ident not in before] == []


def tar_zst_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(buf.getvalue())


@pytest.mark.parametrize("name", ["../escape", "/etc/evil", "a/../../escape"])
async def test_extract_refuses_members_outside_the_target(name: str, tmp_path: Path) -> None:
    data = tar_zst_of([(tarfile.TarInfo("ok"), b"fine"), (tarfile.TarInfo(name), b"evil")])
    with pytest.raises(AgentError, match="refusing archive member"):
        await extract_tar_zst(chunks_of(data), tmp_path / "dest")
    assert not (tmp_path / "escape").exists()


async def test_extract_refuses_a_non_empty_target(sample_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious").write_text("keep me")
    data = await collect(tar_zst_chunks(sample_dir))
    with pytest.raises(AgentError, match="not empty"):
        await extract_tar_zst(chunks_of(data), dest)
    assert (dest / "precious").read_text() == "keep me"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
async def test_extract_reports_a_damaged_archive(damage: str, sample_dir: Path,
                                                 tmp_path: Path) -> None:
    data = bytearray(await collect(tar_zst_chunks(sample_dir)))
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        del data[-len(data) // 3:]
    with pytest.raises(AgentError, match="corrupt archive"):
        await extract_tar_zst(chunks_of(bytes(data)), tmp_path / "dest")


# --- snapshot: what it refuses ------------------------------------------------------------


def test_controldata_parsing_takes_the_fields_a_manifest_needs() -> None:
    text = ("pg_control version number:            1300\n"
            "Database system identifier:           7441234567890123456\n"
            "Database cluster state:               shut down\n"
            "Latest checkpoint location:           0/1A2B3C8\n"
            "Latest checkpoint's TimeLineID:       3\n")
    c = parse_controldata(text)
    assert (c.state, c.system_identifier, c.timeline, c.checkpoint_lsn) == (
        "shut down", "7441234567890123456", 3, "0/1A2B3C8")
    with pytest.raises(AgentError, match="unexpected pg_controldata output"):
        parse_controldata("Database cluster state: shut down\n")


def test_cli_snapshot_of_missing_pgdata_is_one_line(tmp_path: Path, file_store: StoreSpec) -> None:
    proc = agent("snapshot", "--pgdata", str(tmp_path / "nope"), *file_store.cli_args("j"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"jobmesh agent snapshot: PGDATA {tmp_path / 'nope'} does not exist"]


async def test_snapshot_refuses_a_directory_that_is_not_pgdata(tmp_path: Path,
                                                               file_store: StoreSpec) -> None:
    (tmp_path / "notpg").mkdir()
    (tmp_path / "notpg" / "file").write_text("x")
    with pytest.raises(AgentError, match="not a PostgreSQL data directory"):
        await take_snapshot(tmp_path / "notpg", file_store.open(), "j")


def test_cli_snapshot_refuses_a_running_postgres(pg_factory: PgFactory,
                                                 file_store: StoreSpec) -> None:
    inst = cluster(pg_factory, "running")
    try:
        proc = agent("snapshot", "--pgdata", str(inst.datadir), *file_store.cli_args("j"))
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "PostgreSQL is running" in lines[0], proc.stderr
        assert file_store.keys("") == []  # nothing uploaded, not even a key file
    finally:
        inst.stop_quietly()


async def test_snapshot_refuses_a_crashed_cluster(pg_factory: PgFactory,
                                                  file_store: StoreSpec) -> None:
    inst = cluster(pg_factory, "crashed")
    inst.stop("immediate")  # no shutdown checkpoint: it needs crash recovery first
    with pytest.raises(AgentError, match="not shut down cleanly"):
        await take_snapshot(inst.datadir, file_store.open(), "j")


async def test_snapshot_manifest_records_the_cluster_and_is_written_last(
        pg_factory: PgFactory, store: Store) -> None:
    inst = cluster(pg_factory, "manifest")
    inst.stop()
    control = read_controldata(inst.datadir)
    metrics = AgentMetrics()
    m = await take_snapshot(inst.datadir, store, "job1", metrics=metrics)

    stored = Manifest.from_json(await get_bytes(store, snapshot_manifest_key("job1", m.id)))
    assert stored == m
    assert (m.kind, m.job, m.pg_version) == ("pause", "job1", "15")
    assert (m.system_identifier, m.timeline, m.start_lsn) == (
        control.system_identifier, control.timeline, control.checkpoint_lsn)
    # every file, as the objects holding it; nothing but the manifest under the job's prefix
    assert m.objects == [] and m.chunked and m.chunk_size == CHUNK_SIZE and m.key_id
    paths = {f.path for f in m.files}
    assert {"PG_VERSION", "global/pg_control"} <= paths
    assert not {"postmaster.pid", "postmaster.opts"} & paths
    assert m.uncompressed_size == sum(f.size for f in m.files)
    assert [o.key for o in await store.list("job1/")] == [snapshot_manifest_key("job1", m.id)]
    # a new store: every object the manifest references was uploaded by it, once
    names = m.object_names()
    sizes = [await store.size(object_key(n)) for n in names]
    assert None not in sizes
    assert m.extra["new_objects"] == len(names)
    assert m.stored_size == m.extra["new_bytes"] == sum(s for s in sizes if s is not None)
    assert m.uncompressed_size > m.stored_size > 0
    assert await stored_ids(store, "job1") == [m.id]
    assert metrics.registry.get_sample_value(
        "jobmesh_agent_snapshot_bytes_total", {"kind": "pause"}) == m.stored_size
    assert metrics.registry.get_sample_value(
        "jobmesh_agent_snapshot_seconds_count", {"kind": "pause"}) == 1


# --- kill -9 mid-upload ---------------------------------------------------------------------


async def wait_for_upload_in_flight(spec: StoreSpec, job: str, stored_before: int,
                                    proc: asyncio.subprocess.Process) -> str:
    """Return once the agent holds its snapshot lease and has stored objects the store did
    not hold (it is uploading), with the lease's key."""
    while True:
        leases = spec.leases(f"snapshot of {job}")
        if leases and len(spec.keys(OBJECTS_PREFIX)) > stored_before:
            return leases[0]
        try:
            await asyncio.wait_for(proc.wait(), 0.01)  # the agent exiting voids the test
        except TimeoutError:
            continue
        stderr = await proc.stderr.read() if proc.stderr else b""
        raise AssertionError(f"the snapshot ended before its upload was seen: {stderr!r}")


async def test_kill_9_mid_upload_leaves_the_previous_snapshot_latest(
        pg_factory: PgFactory, store_spec: StoreSpec, store: Store,
        restored_instances: list[Instance], pg_root: Path) -> None:
    inst = cluster(pg_factory, "kill9")
    fill(inst, tag="before")
    before = checksums(inst)
    inst.stop()
    first = await take_snapshot(inst.datadir, store, "jk")
    first_keys = store_spec.keys("jk/")
    assert first_keys == [snapshot_manifest_key("jk", first.id)]
    stored_before = len(store_spec.keys(OBJECTS_PREFIX))

    inst.start()
    inst.psql("create extension pgcrypto", database="job_alpha")
    inst.psql("create table ballast as select g, gen_random_bytes(1024) as junk "
              "from generate_series(1, 200000) g", database="job_alpha")  # ~230 MB, incompressible
    inst.stop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobmesh", "agent", "snapshot", "--pgdata", str(inst.datadir),
        *store_spec.cli_args("jk"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lease = await wait_for_upload_in_flight(store_spec, "jk", stored_before, proc)
        proc.send_signal(signal.SIGSTOP)  # freeze it, then make sure it was still mid-upload
        assert lease in store_spec.leases("snapshot of jk")
        assert await stored_ids(store, "jk") == [first.id]
    finally:
        proc.kill()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # no trace under the job's prefix; what it uploaded is unreferenced, for the collector
    assert await stored_ids(store, "jk") == [first.id]
    assert store_spec.keys("jk/") == first_keys
    left_over = await stored_object_names(store) - first.object_names()
    assert left_over

    dest = pg_root / unique("after-kill9")
    result = await restore(dest, store, "jk", s3_endpoint=store_spec.endpoint)
    assert result.manifest.id == first.id and result.skipped == []
    assert checksums(start_restored(dest, restored_instances)) == before

    second = await take_snapshot(inst.datadir, store, "jk")
    assert await stored_ids(store, "jk") == [first.id, second.id]
    # what the killed upload stored is found, not sent again
    assert left_over <= second.object_names()
    assert second.extra["new_objects"] == len(second.object_names() - first.object_names()
                                              - left_over)


async def test_recycled_wal_segments_stay_out_and_the_restore_still_starts(
        pg_factory: PgFactory, store: Store, store_spec: StoreSpec, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst = cluster(pg_factory, "recycle")
    fill(inst, rows=200_000)  # ~60 MB of WAL: later checkpoints rename it to future segments
    inst.psql("checkpoint")
    before = checksums(inst)
    inst.stop()
    control = read_controldata(inst.datadir)
    segments = sorted(p.name for p in (inst.datadir / "pg_wal").iterdir() if len(p.name) == 24)
    redo = run_pg([str(bin_dir() / "pg_controldata"), str(inst.datadir)], env={"LC_ALL": "C"})
    [redo_wal] = [line.split(":")[1].strip() for line in redo.stdout.splitlines()
                  if line.startswith("Latest checkpoint's REDO WAL file")]
    future = [s for s in segments if s > redo_wal]
    assert len(future) >= 2, segments  # otherwise this test shows nothing

    m = await take_snapshot(inst.datadir, store, "rc")
    dest = pg_root / unique("recycle-restored")
    await restore(dest, store, "rc", s3_endpoint=store_spec.endpoint)
    kept = sorted(p.name for p in (dest / "pg_wal").iterdir() if len(p.name) == 24)
    # the checkpoint's segment stays, and the next one only if the record may reach into it
    assert redo_wal in kept and max(kept) <= next_segment(redo_wal)
    assert m.extra["recycled_wal_skipped"] == len(segments) - len(kept)
    assert read_controldata(dest).checkpoint_lsn == control.checkpoint_lsn
    assert checksums(start_restored(dest, restored_instances)) == before


def test_a_zombie_postmaster_does_not_count_as_running():
    import subprocess

    from jobmesh.agent.postgres import pid_alive

    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not pid_alive(child.pid)
    finally:
        child.wait()
