"""list, verify and prune against real stores (a directory and moto's S3 API).

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures; its helpers live in tests/support.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from jobmesh.agent.cas.objects import OBJECTS_PREFIX, name_of_key
from jobmesh.agent.errors import AgentError
from jobmesh.agent.inventory import inventory
from jobmesh.agent.manifest import (
    Manifest,
    ObjectEntry,
    dump_data_key,
    dump_manifest_key,
    history_key,
    new_id,
    now_iso,
    snapshot_data_key,
    snapshot_manifest_key,
    wal_key,
)
from jobmesh.agent.prune import prune, retain, wal_cutoff
from jobmesh.agent.snapshot import take_snapshot
from jobmesh.agent.store import Store, get_bytes, open_store, put_bytes
from jobmesh.agent.verify import verify
from jobmesh.agent.walpartial import Delta, compress, delta_key

pytestmark = pytest.mark.timeout(180)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
JOB = "j1"


@functools.cache
def sid_at(minutes: int) -> str:
    """The same time-ordered id for the same minute, within one test run."""
    return new_id(T0 + timedelta(minutes=minutes))


def seg(tli: int, n: int) -> str:
    return f"{tli:08X}{n // 256:08X}{n % 256:08X}"


async def put_snapshot(store: Store, sid: str, kind: str = "base", *, timeline: int = 1,
                       start_wal: str = "", start_lsn: str = "", data: bytes | None = None,
                       job: str = JOB) -> Manifest:
    """A format 1 snapshot (one data object under the job's prefix), as older agents left
    them: still listed, verified and pruned by the agent itself."""
    data = data if data is not None else os.urandom(3000)
    key = snapshot_data_key(job, sid)
    await put_bytes(store, key, data)
    man = Manifest(kind=kind, id=sid, job=job, created_at=now_iso(),  # type: ignore[arg-type]
                   objects=[ObjectEntry(key[len(job) + 1:], len(data),
                                        hashlib.sha256(data).hexdigest())],
                   pg_version="15", timeline=timeline, start_lsn=start_lsn,
                   start_wal=start_wal, end_wal=start_wal, format=1)
    await put_bytes(store, snapshot_manifest_key(job, sid), man.to_json())
    return man


async def put_dump(store: Store, did: str, *, job: str = JOB) -> Manifest:
    data = b"PGDMP" + os.urandom(500)
    key = dump_data_key(job, did)
    await put_bytes(store, key, data)
    man = Manifest(kind="dump", id=did, job=job, created_at=now_iso(),
                   objects=[ObjectEntry(key[len(job) + 1:], len(data),
                                        hashlib.sha256(data).hexdigest())])
    await put_bytes(store, dump_manifest_key(job, did), man.to_json())
    return man


async def put_wal(store: Store, *names: str, job: str = JOB) -> list[str]:
    keys = []
    for name in names:
        keys.append(wal_key(job, name))
        await put_bytes(store, keys[-1], zstandard.ZstdCompressor().compress(
            name.encode() * 1000))
    return keys


async def keys(store: Store, job: str = JOB) -> set[str]:
    return {o.key for o in await store.list(f"{job}/")}


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.create_bucket(f"inv-{os.urandom(4).hex()}")
    return f"s3://{bucket}/pre"


@pytest.fixture
async def store(store_url):
    s = open_store(store_url)
    yield s
    await s.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobmesh", "agent", *args],
                          capture_output=True, text=True, timeout=120)


# --- list ------------------------------------------------------------------------------


async def test_list_counts_only_objects_with_manifests(store):
    a = await put_snapshot(store, sid_at(1), "pause", start_lsn="0/3000028")
    b = await put_snapshot(store, sid_at(2), "base", start_wal=seg(1, 5))
    d = await put_dump(store, sid_at(3))
    await put_bytes(store, snapshot_data_key(JOB, sid_at(4)), b"died mid-upload")
    await put_bytes(store, dump_data_key(JOB, sid_at(5)), b"PGDMP half")
    await put_snapshot(store, sid_at(1), job="other-job")
    inv = await inventory(store, JOB)
    assert [(s.id, s.kind) for s in inv.snapshots] == [(a.id, "pause"), (b.id, "base")]
    assert inv.snapshots[0].size == a.objects[0].size
    assert inv.snapshots[1].start_wal == seg(1, 5)
    assert [x.id for x in inv.dumps] == [d.id]
    assert sorted(o.key for o in inv.orphaned) == sorted(
        [snapshot_data_key(JOB, sid_at(4)), dump_data_key(JOB, sid_at(5))])


async def test_list_reports_the_wal_range_of_each_timeline_and_its_holes(store):
    await put_wal(store, seg(1, 1), seg(1, 2), seg(1, 3), seg(2, 3), seg(2, 4), seg(2, 7),
                  seg(1, 255), seg(1, 256))
    await put_bytes(store, history_key(JOB, "00000002.history"),
                    zstandard.ZstdCompressor().compress(b"1\t0/3000000\tno reason"))
    inv = await inventory(store, JOB)
    assert [(r.timeline, r.first, r.last, r.segments, r.missing) for r in inv.wal] == [
        (1, seg(1, 1), seg(1, 256), 5, 251),
        (2, seg(2, 3), seg(2, 7), 3, 2),
    ]
    assert inv.orphaned == []


def test_list_on_the_command_line(tmp_path):
    import asyncio

    url = f"file://{tmp_path}/store"

    async def setup() -> Manifest:
        s = open_store(url)
        m = await put_snapshot(s, sid_at(1), "base", start_wal=seg(1, 2))
        await put_wal(s, seg(1, 2), seg(1, 3))
        await put_bytes(s, snapshot_data_key(JOB, sid_at(9)), b"partial")
        return m

    man = asyncio.run(setup())
    proc = _cli("list", "--store", url, "--job", JOB)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"  {man.id}  base" in out
    assert f"timeline 1: {seg(1, 2)}..{seg(1, 3)}  2 segments" in out
    assert "orphaned objects: 1 " in out
    assert sid_at(9) not in out
    as_json = json.loads(_cli("list", "--store", url, "--job", JOB, "--json").stdout)
    assert [s["id"] for s in as_json["snapshots"]] == [man.id]
    assert as_json["orphaned"] == {"count": 1, "bytes": len(b"partial")}


# --- verify ------------------------------------------------------------------------


async def test_verify_finds_nothing_wrong_with_an_intact_store(store):
    await put_snapshot(store, sid_at(1), start_wal=seg(1, 1))
    await put_dump(store, sid_at(2))
    await put_wal(store, seg(1, 1), seg(1, 2))
    assert await verify(store, JOB) == []


async def test_verify_reports_an_orphaned_object_without_checking_its_content(store):
    await put_snapshot(store, sid_at(1), start_wal=seg(1, 1))
    orphan = snapshot_data_key(JOB, sid_at(3))
    await put_bytes(store, orphan, b"no manifest lists it")
    [problem] = await verify(store, JOB)
    assert problem.startswith(f"{orphan}: orphaned object (20 bytes")


async def test_verify_names_every_bad_object(store):
    ok = await put_snapshot(store, sid_at(1))
    flipped = await put_snapshot(store, sid_at(2))
    short = await put_snapshot(store, sid_at(3))
    gone = await put_snapshot(store, sid_at(4))
    dump = await put_dump(store, sid_at(5))
    good_wal, bad_wal, cut_wal = await put_wal(store, seg(1, 1), seg(1, 2), seg(1, 3))

    async def rewrite(key: str, change) -> None:
        await put_bytes(store, key, change(await get_bytes(store, key)))

    await rewrite(snapshot_data_key(JOB, flipped.id), lambda b: bytes([b[0] ^ 1]) + b[1:])
    await rewrite(snapshot_data_key(JOB, short.id), lambda b: b[:-1])
    await store.delete(snapshot_data_key(JOB, gone.id))
    await rewrite(dump_data_key(JOB, dump.id), lambda b: b + b"!")
    await rewrite(bad_wal, lambda b: b"not zstd at all")
    await rewrite(cut_wal, lambda b: b[:-4])
    await put_bytes(store, snapshot_manifest_key(JOB, sid_at(6)), b"{garbage")

    problems = await verify(store, JOB)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    for key in [snapshot_data_key(JOB, flipped.id), snapshot_data_key(JOB, short.id),
                snapshot_data_key(JOB, gone.id), dump_data_key(JOB, dump.id), bad_wal, cut_wal,
                snapshot_manifest_key(JOB, sid_at(6))]:
        assert key in text
    assert snapshot_data_key(JOB, ok.id) not in text and good_wal not in text
    assert "sha256 mismatch" in text and "missing" in text and "truncated zstd" in text


def test_verify_exits_1_on_the_command_line_and_lists_the_bad_objects(tmp_path):
    import asyncio

    url = f"file://{tmp_path}/store"

    async def setup() -> str:
        s = open_store(url)
        m = await put_snapshot(s, sid_at(1))
        key = snapshot_data_key(JOB, m.id)
        await put_bytes(s, key, b"x" * m.objects[0].size)
        return key

    bad = asyncio.run(setup())
    proc = _cli("verify", "--store", url, "--job", JOB)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{bad}: sha256 mismatch (snapshot {sid_at(1)})"]
    assert proc.stderr.strip() == f"jobmesh agent verify: 1 bad object(s) in job {JOB}"


# --- prune -------------------------------------------------------------------------


async def test_prune_keeps_the_newest_snapshots_and_the_wal_they_need(store):
    s1 = await put_snapshot(store, sid_at(1), "base", start_wal=seg(1, 2))
    s2 = await put_snapshot(store, sid_at(2), "pause", start_lsn="0/5000028")
    s3 = await put_snapshot(store, sid_at(3), "base", start_wal=seg(1, 7))
    s4 = await put_snapshot(store, sid_at(4), "base", start_wal=seg(1, 9))
    wal = await put_wal(store, *(seg(1, n) for n in range(1, 11)))
    await put_bytes(store, history_key(JOB, "00000002.history"),
                    zstandard.ZstdCompressor().compress(b"1\t0/3000000\tno reason"))
    d = await put_dump(store, sid_at(0))
    deleted = await prune(store, JOB, 2)
    left = await keys(store)
    assert {x.id for x in (await inventory(store, JOB)).snapshots} == {s3.id, s4.id}
    for gone in (s1, s2):
        assert snapshot_manifest_key(JOB, gone.id) not in left
        assert snapshot_data_key(JOB, gone.id) not in left
    assert sorted(k for k in left if "/wal/0" in k) == wal[6:]  # from s3's start_wal on
    assert history_key(JOB, "00000002.history") in left
    assert dump_manifest_key(JOB, d.id) in left  # dumps are exports: never pruned
    assert set(deleted) == {snapshot_manifest_key(JOB, s1.id), snapshot_data_key(JOB, s1.id),
                            snapshot_manifest_key(JOB, s2.id), snapshot_data_key(JOB, s2.id),
                            *wal[:6]}
    assert await verify(store, JOB) == []


async def test_prune_deletes_each_manifest_before_its_data(store):
    old = await put_snapshot(store, sid_at(1))
    await put_snapshot(store, sid_at(2))
    deleted = await prune(store, JOB, 1)
    assert deleted.index(snapshot_manifest_key(JOB, old.id)) < deleted.index(
        snapshot_data_key(JOB, old.id))


class CrashAfter:
    """A store whose deletes fail after ``n`` succeeded, like an agent killed mid-prune."""

    def __init__(self, inner: Store, n: int) -> None:
        self.inner, self.n, self.url = inner, n, inner.url

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def delete(self, key: str) -> None:
        if self.n <= 0:
            raise RuntimeError("killed")
        self.n -= 1
        await self.inner.delete(key)


async def test_a_prune_killed_midway_never_leaves_a_manifest_without_its_data(store):
    old = await put_snapshot(store, sid_at(1))
    new = await put_snapshot(store, sid_at(2))
    with pytest.raises(RuntimeError, match="killed"):
        await prune(CrashAfter(store, 1), JOB, 1)
    inv = await inventory(store, JOB)
    assert [s.id for s in inv.snapshots] == [new.id]
    assert [o.key for o in inv.orphaned] == [snapshot_data_key(JOB, old.id)]
    # the kept snapshot is whole: its data is there, only the old data is left over
    [problem] = await verify(store, JOB)
    assert problem.startswith(f"{snapshot_data_key(JOB, old.id)}: orphaned object")
    assert await prune(store, JOB, 1) == [snapshot_data_key(JOB, old.id)]
    assert (await inventory(store, JOB)).orphaned == []
    assert await verify(store, JOB) == []


async def test_prune_after_a_pause_snapshot_drops_the_wal_before_its_checkpoint(store):
    await put_snapshot(store, sid_at(1), "base", start_wal=seg(1, 1))
    await put_snapshot(store, sid_at(2), "pause", timeline=1, start_lsn="0/4000028")
    wal = await put_wal(store, *(seg(1, n) for n in range(1, 7)))
    await prune(store, JOB, 1)
    assert sorted(k for k in await keys(store) if "/wal/" in k) == wal[3:]  # segment 4 on


async def test_prune_never_drops_wal_a_kept_snapshot_on_a_newer_timeline_needs(store):
    # After a point-in-time restore, timeline 2 branched off at segment 3, before s1 started.
    await put_snapshot(store, sid_at(0), "base", start_wal=seg(1, 1))
    await put_snapshot(store, sid_at(1), "base", start_wal=seg(1, 6))
    await put_snapshot(store, sid_at(2), "base", timeline=2, start_wal=seg(2, 3))
    wal = await put_wal(store, *(seg(1, n) for n in range(1, 8)), seg(2, 3), seg(2, 4))
    await prune(store, JOB, 2)
    left = {k for k in await keys(store) if "/wal/" in k}
    assert left == set(wal[2:])  # nothing below segment 3 on any timeline is needed


async def test_prune_keeps_all_wal_when_a_kept_snapshot_does_not_say_where_it_starts(store):
    await put_snapshot(store, sid_at(1), "base", start_wal=seg(1, 5))
    await put_snapshot(store, sid_at(2), "base")
    wal = await put_wal(store, seg(1, 1), seg(1, 2))
    await prune(store, JOB, 1)
    assert {k for k in await keys(store) if "/wal/" in k} == set(wal)


async def test_prune_deletes_orphans_older_than_the_newest_manifest_only(store):
    dead_snap = snapshot_data_key(JOB, sid_at(1))
    dead_dump = dump_data_key(JOB, sid_at(1))
    await put_bytes(store, dead_snap, b"died")
    await put_bytes(store, dead_dump, b"died")
    await put_snapshot(store, sid_at(2))
    await put_dump(store, sid_at(2))
    uploading_snap = snapshot_data_key(JOB, sid_at(3))
    uploading_dump = dump_data_key(JOB, sid_at(3))
    await put_bytes(store, uploading_snap, b"in progress")
    await put_bytes(store, uploading_dump, b"in progress")
    assert sorted(await prune(store, JOB, 5)) == sorted([dead_snap, dead_dump])
    left = await keys(store)
    assert uploading_snap in left and uploading_dump in left


async def test_prune_leaves_snapshots_with_unreadable_manifests_alone(store):
    strange = sid_at(1)
    await put_bytes(store, snapshot_data_key(JOB, strange), b"data of a newer agent")
    await put_bytes(store, snapshot_manifest_key(JOB, strange), b'{"format": 99}')
    await put_snapshot(store, sid_at(2))
    assert await prune(store, JOB, 1) == []
    inv = await inventory(store, JOB)
    assert inv.unreadable == [snapshot_manifest_key(JOB, strange)] and inv.orphaned == []


async def test_prune_dry_run_deletes_nothing(store):
    await put_snapshot(store, sid_at(1))
    await put_snapshot(store, sid_at(2))
    before = await keys(store)
    assert len(await prune(store, JOB, 1, dry_run=True)) == 2
    assert await keys(store) == before


async def test_prune_refuses_to_keep_nothing(store):
    with pytest.raises(AgentError, match="at least 1"):
        await prune(store, JOB, 0)


def test_prune_on_the_command_line(tmp_path):
    import asyncio

    url = f"file://{tmp_path}/store"

    async def setup() -> list[Manifest]:
        s = open_store(url)
        return [await put_snapshot(s, sid_at(n)) for n in range(3)]

    mans = asyncio.run(setup())
    bad = _cli("prune", "--store", url, "--job", JOB, "--keep", "0")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("jobmesh agent prune: --keep must be at least 1")
    proc = _cli("prune", "--store", url, "--job", JOB, "--keep", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4
    assert proc.stderr.strip() == "deleted 4 object(s)"
    listed = json.loads(_cli("list", "--store", url, "--job", JOB, "--json").stdout)
    assert [s["id"] for s in listed["snapshots"]] == [mans[-1].id]


def test_wal_cutoff_is_the_lowest_start_of_the_kept_snapshots():
    def m(**kw) -> Manifest:
        return Manifest(kind="base", id="x", job="j", created_at="", objects=[], **kw)

    assert wal_cutoff([m(start_wal=seg(1, 9)), m(start_wal=seg(2, 4))]) == 4
    assert wal_cutoff([m(timeline=1, start_lsn="1/02000028")]) == 256 + 2
    assert wal_cutoff([m(start_wal=seg(1, 9)), m()]) is None
    assert wal_cutoff([]) is None


# --- with real snapshots -----------------------------------------------------------


async def test_real_pause_snapshots_are_listed_verified_and_pruned(pg_factory, store):
    inst = pg_factory(f"inventory-{os.urandom(3).hex()}", databases=())
    try:
        inst.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")
        inst.stop()
        first = await take_snapshot(inst.datadir, store, JOB)
        inst.start()
        inst.psql("INSERT INTO t SELECT 1")
        inst.stop()
        second = await take_snapshot(inst.datadir, store, JOB)
    finally:
        inst.stop_quietly()
    inv = await inventory(store, JOB)
    assert [(s.id, s.kind) for s in inv.snapshots] == [(first.id, "pause"), (second.id, "pause")]
    assert inv.snapshots[1].start_lsn == second.start_lsn and inv.orphaned == []
    # under the job's prefix only the manifests: the data is in store-wide objects
    assert await keys(store) == {snapshot_manifest_key(JOB, first.id),
                                 snapshot_manifest_key(JOB, second.id)}
    objects = {o.key for o in await store.list(OBJECTS_PREFIX)}
    assert {name_of_key(k) for k in objects} == first.object_names() | second.object_names()
    assert await verify(store, JOB) == []
    deleted = await prune(store, JOB, 1)
    # the objects may be shared with other jobs: only the collector (`store gc`) deletes them
    assert deleted == [snapshot_manifest_key(JOB, first.id)]
    assert {o.key for o in await store.list(OBJECTS_PREFIX)} == objects
    assert [s.id for s in (await inventory(store, JOB)).snapshots] == [second.id]
    assert await verify(store, JOB) == []


# --- retention (what agent serve runs after each base backup) -------------------------------


async def put_delta(store: Store, segment: str, start: int, end: int) -> str:
    key = delta_key(JOB, Delta(segment, start, end))
    await put_bytes(store, key, compress(b"\1" * (end - start)))
    return key


async def test_retention_keeps_two_base_backups_every_pause_and_the_wal_after_them(store):
    b1 = await put_snapshot(store, sid_at(1), "base", start_wal=seg(1, 2))
    b2 = await put_snapshot(store, sid_at(2), "base", start_wal=seg(1, 5))
    p1 = await put_snapshot(store, sid_at(3), "pause", start_lsn="0/6000028")
    b3 = await put_snapshot(store, sid_at(4), "base", timeline=2, start_wal=seg(2, 8))
    wal = await put_wal(store, *(seg(1, n) for n in range(1, 8)), seg(2, 7), seg(2, 8))
    old_delta = await put_delta(store, seg(1, 4), 0, 100)  # an old timeline's last stream
    new_delta = await put_delta(store, seg(2, 9), 0, 100)
    history = history_key(JOB, "00000002.history")
    await put_bytes(store, history, zstandard.ZstdCompressor().compress(b"1\t0/7000000\tx"))
    deleted = await retain(store, JOB, 2)
    left = await keys(store)
    assert {s.id for s in (await inventory(store, JOB)).snapshots} == {p1.id, b2.id, b3.id}
    assert snapshot_data_key(JOB, b1.id) not in left
    # WAL from the oldest kept base backup's start (segment 5) on, on every timeline
    assert sorted(k for k in left if "/wal/0" in k) == wal[4:]
    assert new_delta in left and old_delta not in left and history in left
    assert set(deleted) == {snapshot_manifest_key(JOB, b1.id), snapshot_data_key(JOB, b1.id),
                            *wal[:4], old_delta}


async def test_retention_keeps_the_wal_the_newest_pause_snapshot_replays(store):
    await put_snapshot(store, sid_at(1), "base", start_wal=seg(1, 2))
    await put_snapshot(store, sid_at(2), "pause", start_lsn="0/4000028")
    await put_snapshot(store, sid_at(3), "base", start_wal=seg(1, 6))
    await put_snapshot(store, sid_at(4), "base", start_wal=seg(1, 8))
    wal = await put_wal(store, *(seg(1, n) for n in range(1, 10)))
    await retain(store, JOB, 2)
    # the older kept base starts at 6, but a restore of the pause replays from 4
    assert sorted(k for k in await keys(store) if "/wal/" in k) == wal[3:]


async def test_retention_without_a_base_backup_deletes_nothing(store):
    await put_snapshot(store, sid_at(1), "pause", start_lsn="0/4000028")
    await put_wal(store, seg(1, 1))
    before = await keys(store)
    assert await retain(store, JOB, 2) == []
    assert await keys(store) == before
