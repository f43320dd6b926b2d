"""Format 2 snapshots (agent/cas): incremental pauses, delta restores, old stores, failed uploads.

Everything is real: PostgreSQL 15 clusters, the file:// store in a temp
directory and moto's S3 API server. A restore counts only if the restored
cluster starts and every table has the same contents (row counts and an md5
over all rows in key order) as the source had at snapshot time; a delta
restore must also leave exactly the files the manifest lists, byte for byte.

Over ~400 lines on purpose: one specification per behaviour of the snapshot format,
sharing this module's clusters and helpers.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobmesh.agent.cas import keyring_for
from jobmesh.agent.cas.download import restore_files
from jobmesh.agent.cas.hashcache import CACHE_NAME, read_cache
from jobmesh.agent.cas.keys import STORE_KEY_ENV
from jobmesh.agent.cas.leases import live
from jobmesh.agent.cas.objects import OBJECTS_PREFIX, Objects, object_key
from jobmesh.agent.errors import AgentError
from jobmesh.agent.manifest import FileEntry, Manifest, job_prefix, snapshot_ids_with_manifest
from jobmesh.agent.postgres import Instance
from jobmesh.agent.restore import restore
from jobmesh.agent.snapshot import read_controldata, take_snapshot, wal_cuts
from jobmesh.agent.store import Store, StoreError, get_bytes
from jobmesh.agent.store.counting import CountingStore
from tests.support.clusters import checksums, cluster, fill, start_restored, unique
from tests.support.postgres import PgFactory
from tests.support.stores import StoreSpec
from tests.support.v1store import take_v1_snapshot

pytestmark = pytest.mark.timeout(180)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --- helpers (this module's own) ----------------------------------------------------------


async def object_keys(store: Store) -> set[str]:
    return {info.key for info in await store.list(OBJECTS_PREFIX)}


async def stored_ids(store: Store, job: str) -> list[str]:
    return snapshot_ids_with_manifest([o.key for o in await store.list(job_prefix(job))], job)


async def objects_for(store: Store, m: Manifest) -> Objects:
    return Objects(store, (await keyring_for(store)).get(m.key_id))


def regular(m: Manifest) -> list[FileEntry]:
    return [f for f in m.files if f.link is None]


def differing(old: Manifest, new: Manifest) -> tuple[set[str], set[str]]:
    """The files of ``new`` a copy of ``old`` must have written, and the objects fetched."""
    before = {f.path: f.chunks for f in regular(old)}
    paths, names = set(), set()
    for f in regular(new):
        have = before.get(f.path)
        changed = [name for i, name in enumerate(f.chunks)
                   if have is None or i >= len(have) or have[i] != name]
        if have is None or changed or len(have) != len(f.chunks):
            paths.add(f.path)
        names.update(changed)
    return paths, names


def cuts_of(pgdata: Path) -> dict[str, int]:
    return wal_cuts(read_controldata(pgdata))


def assert_same_files(copy: Path, source: Path, m: Manifest, cuts: dict[str, int]) -> None:
    """``copy`` holds exactly ``m``'s entries, each with the source's bytes (WAL past the
    shutdown checkpoint as zeros), size, mode and recorded mtime."""
    listed = {f.path for f in m.files} | {d.path for d in m.dirs} | {CACHE_NAME}
    present = set()
    for dirpath, dirs, names in os.walk(copy):
        for name in dirs + names:
            present.add(os.path.relpath(os.path.join(dirpath, name), copy))
    assert present == listed
    for f in regular(m):
        data = (copy / f.path).read_bytes()
        want = (source / f.path).read_bytes()
        if f.path in cuts:
            cut = cuts[f.path]
            want = want[:cut] + bytes(len(want) - cut)
        assert len(data) == f.size and data == want, f.path
        st = os.lstat(copy / f.path)
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (f.mode, f.mtime_ns), f.path
    for f in m.files:
        if f.link is not None:
            assert os.readlink(copy / f.path) == f.link


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def sha256_windows(data: bytes, width: int = 16) -> list[str]:
    digest = hashlib.sha256(data).hexdigest()
    return [digest[i:i + width] for i in range(len(digest) - width + 1)]


class FailingStore(CountingStore):
    """Uploads the first ``allow`` objects, then fails every object upload."""

    def __init__(self, inner: Store, allow: int) -> None:
        super().__init__(inner)
        self.allow = allow
        self.failed = 0

    async def put_new(self, key: str, data: bytes) -> bool:  # (how objects are written)
        if key.startswith(OBJECTS_PREFIX):
            if self.allow <= 0:
                self.failed += 1
                raise StoreError(f"injected failure uploading {key}")
            self.allow -= 1
        return await super().put_new(key, data)


class StallingStore(CountingStore):
    """Uploads the first ``allow`` objects; the next upload hangs (until cancelled) and
    sets ``stalled``."""

    def __init__(self, inner: Store, allow: int) -> None:
        super().__init__(inner)
        self.allow = allow
        self.stalled = asyncio.Event()

    async def put_new(self, key: str, data: bytes) -> bool:
        if key.startswith(OBJECTS_PREFIX):
            if self.allow <= 0:
                self.stalled.set()
                await asyncio.get_running_loop().create_future()  # until cancelled
            self.allow -= 1
        return await super().put_new(key, data)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def fstore(file_store: StoreSpec) -> AsyncIterator[Store]:
    s = file_store.open()
    yield s
    await s.close()


@pytest.fixture(scope="module")
def frozen(pg_factory: PgFactory) -> Iterator[tuple[Instance, dict[str, str]]]:
    """A stopped cluster with known contents, for tests that only read it, and its sums."""
    inst = cluster(pg_factory, "cas-frozen")
    fill(inst, rows=1000)
    sums = checksums(inst)
    inst.stop()
    yield inst, sums
    inst.stop_quietly()


@pytest.fixture(scope="module")
def v1_source(pg_factory: PgFactory) -> Iterator[tuple[Instance, dict[str, str]]]:
    """Like ``frozen``, but never snapshotted as format 2 (no hash cache in it), as the
    PGDATA an older agent paused was."""
    inst = cluster(pg_factory, "cas-v1")
    fill(inst, rows=1000, tag="v1")
    sums = checksums(inst)
    inst.stop()
    yield inst, sums
    inst.stop_quietly()


@pytest.fixture(autouse=True)
def no_store_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_KEY_ENV, raising=False)


async def paused_twice(pg_factory: PgFactory, store: Store, job: str
                       ) -> tuple[Instance, Manifest, Manifest, dict[str, str]]:
    """A cluster paused (A), resumed to change one small table, and paused again (B);
    returns it (stopped), both manifests and the sums at B."""
    inst = cluster(pg_factory, job)
    fill(inst, rows=1000)
    inst.stop()
    a = await take_snapshot(inst.datadir, store, job)
    inst.start()
    inst.psql("update known set tag = 'b' where id <= 10", database="job_alpha")
    inst.psql("insert into known values (1001, 'b', 'new row')", database="job_alpha")
    sums = checksums(inst)
    inst.stop()
    b = await take_snapshot(inst.datadir, store, job)
    return inst, a, b, sums


# --- names --------------------------------------------------------------------------------


async def test_stored_keys_reveal_no_content_hash(
        frozen: tuple[Instance, dict[str, str]], fstore: Store) -> None:
    inst, _sums = frozen
    m = await take_snapshot(inst.datadir, fstore, "names")
    listing = "\n".join(info.key for info in await fstore.list(""))
    assert m.object_names() and all(object_key(n) in listing for n in m.object_names())
    checked = 0
    for f in regular(m):
        if f.path.startswith("pg_wal/"):
            continue  # past the checkpoint the stored chunk is zeros, not the file's bytes
        data = (inst.datadir / f.path).read_bytes()
        for i in range(len(f.chunks)):
            chunk = data[i * m.chunk_size:(i + 1) * m.chunk_size]
            assert f.chunks[i] != hashlib.sha256(chunk).hexdigest()
            leaked = [w for w in sha256_windows(chunk) if w in listing]
            assert not leaked, (f.path, i, leaked)
            checked += 1
    assert checked > 100


# --- incremental pauses -------------------------------------------------------------------


async def test_an_incremental_pause_uploads_only_the_changed_objects(
        pg_factory: PgFactory, store: Store) -> None:
    inst = cluster(pg_factory, "incr")
    fill(inst, rows=1000)
    inst.stop()
    assert await object_keys(store) == set()
    a = await take_snapshot(inst.datadir, store, "incr")
    after_a = await object_keys(store)
    assert a.extra["new_objects"] == len(after_a) == len(a.object_names())
    assert after_a == {object_key(n) for n in a.object_names()}

    inst.start()
    inst.psql("insert into known values (1001, 'b', 'one more row')", database="job_alpha")
    inst.stop()
    b = await take_snapshot(inst.datadir, store, "incr")
    new = await object_keys(store) - after_a
    assert b.extra["new_objects"] == len(new)
    # exactly the objects the new snapshot references and the old one did not
    assert new == {object_key(n) for n in b.object_names() - a.object_names()}
    assert 0 < len(new) <= len(b.object_names()) // 10, (len(new), len(b.object_names()))
    # only files PostgreSQL wrote in between (new size or mtime) were read, and the WAL
    # segment of the shutdown checkpoint (which is never cached), up to the checkpoint
    cuts = cuts_of(inst.datadir)
    before = {f.path: (f.size, f.mtime_ns) for f in regular(a)}
    changed = sum(f.size for f in regular(b) if f.path not in cuts
                  and before.get(f.path) != (f.size, f.mtime_ns))
    wal = sum(f.size for f in regular(b) if f.path in cuts)
    assert changed <= b.extra["read_bytes"] <= changed + wal, (changed, wal, b.extra)
    assert b.extra["read_bytes"] < b.uncompressed_size // 2, (b.extra, b.uncompressed_size)

    c = await take_snapshot(inst.datadir, store, "incr")  # nothing ran in between
    assert c.extra["new_objects"] == 0 and c.object_names() == b.object_names()
    assert await object_keys(store) == after_a | new
    assert await stored_ids(store, "incr") == sorted([a.id, b.id, c.id])


async def test_a_pause_with_nothing_changed_uploads_nothing(
        frozen: tuple[Instance, dict[str, str]], fstore: Store) -> None:
    inst, _sums = frozen
    first = await take_snapshot(inst.datadir, fstore, "same")
    keys = await object_keys(fstore)
    again = await take_snapshot(inst.datadir, fstore, "same")
    assert again.extra["new_objects"] == 0 and again.extra["new_bytes"] == 0
    assert await object_keys(fstore) == keys
    assert again.files == first.files and again.dirs == first.dirs
    # nothing is read but the WAL segment holding the shutdown checkpoint (never cached)
    cuts = cuts_of(inst.datadir)
    assert 0 < again.extra["read_bytes"] <= sum(f.size for f in regular(again) if f.path in cuts)


# --- delta restore ------------------------------------------------------------------------


async def test_a_delta_restore_writes_only_the_files_that_differ(
        pg_factory: PgFactory, fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst, a, b, sums_b = await paused_twice(pg_factory, fstore, "delta")
    dest = pg_root / unique("delta-restored")
    first = await restore_files(await objects_for(fstore, a), dest, a)
    assert (first.written_files, first.reused_files) == (len(regular(a)), 0)

    stats = await restore_files(await objects_for(fstore, b), dest, b)
    paths, names = differing(a, b)
    assert stats.written_files == len(paths) and stats.reused_files == len(regular(b)) - len(paths)
    assert set(stats.names) == names and stats.fetched_objects == len(names)
    assert all(n == 1 for n in stats.names.values())  # each object fetched once
    assert 0 < len(paths) <= len(regular(b)) // 10, sorted(paths)
    assert stats.fetched_objects <= len(b.object_names()) // 10
    assert stats.hashed_bytes == 0  # the cache A's restore left vouched for every file
    assert_same_files(dest, inst.datadir, b, cuts_of(inst.datadir))
    assert checksums(start_restored(dest, restored_instances)) == sums_b


async def test_a_delta_restore_repairs_deleted_and_changed_files_and_reuses_the_rest(
        pg_factory: PgFactory, fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst = cluster(pg_factory, "repair")
    fill(inst, rows=1000)
    known = inst.psql("select pg_relation_filepath('known')", database="job_alpha")
    accounts = inst.psql("select pg_relation_filepath('pgbench_accounts')", database="job_alpha")
    sums = checksums(inst)
    inst.stop()
    m = await take_snapshot(inst.datadir, fstore, "repair")
    objects = await objects_for(fstore, m)
    dest = pg_root / unique("repair-restored")
    await restore_files(objects, dest, m)

    (dest / known).unlink()
    size = (dest / accounts).stat().st_size
    assert size > 2 * m.chunk_size
    flip_byte(dest / accounts, size // 2)  # written now: its cache entry no longer matches

    stats = await restore_files(objects, dest, m)
    assert (stats.written_files, stats.fetched_objects) == (2, 2), stats
    assert stats.reused_files == len(regular(m)) - 2 > 0
    assert stats.hashed_bytes == size  # only the changed file was read to compare it
    assert_same_files(dest, inst.datadir, m, cuts_of(inst.datadir))
    assert checksums(start_restored(dest, restored_instances)) == sums


async def test_restore_with_delta_over_an_older_copy_fetches_little(
        pg_factory: PgFactory, fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst, a, b, sums_b = await paused_twice(pg_factory, fstore, "delta-api")
    dest = pg_root / unique("delta-api-restored")
    await restore(dest, fstore, "delta-api", snapshot_id=a.id)
    (dest / "stray-file").write_text("not in any snapshot")
    result = await restore(dest, fstore, "delta-api", delta=True)
    assert (result.manifest.id, result.skipped, result.recovery_configured) == (b.id, [], False)
    assert 0 < result.bytes_restored < b.uncompressed_size // 10
    assert not (dest / "stray-file").exists()
    assert_same_files(dest, inst.datadir, b, cuts_of(inst.datadir))
    assert checksums(start_restored(dest, restored_instances)) == sums_b


# --- encryption ---------------------------------------------------------------------------


async def test_an_encrypted_store_round_trips_and_needs_its_key(
        frozen: tuple[Instance, dict[str, str]], fstore: Store, pg_root: Path,
        monkeypatch: pytest.MonkeyPatch, restored_instances: list[Instance]) -> None:
    inst, sums = frozen
    key = os.urandom(32).hex()
    monkeypatch.setenv(STORE_KEY_ENV, key)
    m = await take_snapshot(inst.datadir, fstore, "sealed")
    for name in m.object_names():  # sealed: a nonce and ciphertext, not a zstd frame
        assert not (await get_bytes(fstore, object_key(name))).startswith(ZSTD_MAGIC)

    # without the key first: restore remembers a store's keys once it has read them
    monkeypatch.delenv(STORE_KEY_ENV)
    refused = pg_root / unique("sealed-nokey")
    with pytest.raises(AgentError, match=STORE_KEY_ENV):
        await restore(refused, fstore, "sealed")
    assert not refused.exists()

    monkeypatch.setenv(STORE_KEY_ENV, key)
    dest = pg_root / unique("sealed-restored")
    result = await restore(dest, fstore, "sealed")
    assert (result.manifest.id, result.skipped) == (m.id, [])
    assert checksums(start_restored(dest, restored_instances)) == sums


# --- format 1 stores ----------------------------------------------------------------------


async def test_a_format_1_snapshot_restores(v1_source: tuple[Instance, dict[str, str]],
                                            fstore: Store, pg_root: Path,
                                            restored_instances: list[Instance]) -> None:
    inst, sums = v1_source
    v1 = await take_v1_snapshot(inst.datadir, fstore, "old")
    assert await object_keys(fstore) == set()  # no content-addressed objects at all
    dest = pg_root / unique("v1-restored")
    result = await restore(dest, fstore, "old")
    assert (result.manifest.id, result.manifest.format, result.skipped) == (v1.id, 1, [])
    assert checksums(start_restored(dest, restored_instances)) == sums


async def test_a_format_1_snapshot_restores_with_delta_into_a_non_empty_directory(
        v1_source: tuple[Instance, dict[str, str]], fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst, sums = v1_source
    await take_v1_snapshot(inst.datadir, fstore, "old-delta")
    dest = pg_root / unique("v1-delta")
    (dest / "base" / "1").mkdir(parents=True)
    (dest / "PG_VERSION").write_text("14\n")
    (dest / "base" / "1" / "1259").write_bytes(os.urandom(8192))
    result = await restore(dest, fstore, "old-delta", delta=True)
    assert result.manifest.format == 1
    assert (dest / "base/1/1259").read_bytes() == (inst.datadir / "base/1/1259").read_bytes()
    assert (dest / "PG_VERSION").read_text() == "15\n"
    assert checksums(start_restored(dest, restored_instances)) == sums


async def test_a_format_2_pause_on_top_of_a_format_1_store_restores_either(
        pg_factory: PgFactory, fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst = cluster(pg_factory, "upgrade")
    fill(inst, rows=1000, tag="old")
    sums_old = checksums(inst)
    inst.stop()
    v1 = await take_v1_snapshot(inst.datadir, fstore, "upgrade")
    inst.start()
    inst.psql("update known set tag = 'new'", database="job_alpha")
    sums_new = checksums(inst)
    inst.stop()
    v2 = await take_snapshot(inst.datadir, fstore, "upgrade")
    assert v2.format == 2 and await stored_ids(fstore, "upgrade") == [v1.id, v2.id]

    dest = pg_root / unique("upgrade-restored")
    await restore(dest, fstore, "upgrade", snapshot_id=v1.id)
    result = await restore(dest, fstore, "upgrade", delta=True)  # over the format 1 copy
    assert result.manifest.id == v2.id
    assert_same_files(dest, inst.datadir, v2, cuts_of(inst.datadir))
    assert checksums(start_restored(dest, restored_instances)) == sums_new

    old = pg_root / unique("upgrade-old")
    await restore(old, fstore, "upgrade", snapshot_id=v1.id)
    assert checksums(start_restored(old, restored_instances)) == sums_old


# --- failed uploads -----------------------------------------------------------------------


async def assert_still_latest(store: Store, job: str, m: Manifest, pgdata: Path, pg_root: Path,
                              sums: dict[str, str], started: list[Instance]) -> None:
    assert await stored_ids(store, job) == [m.id]
    assert await live(store) == []  # its lease is released
    cache = read_cache(pgdata, m.key_id)
    assert cache is not None and cache.source == (job, m.id)  # as the good pause left it
    dest = pg_root / unique(f"{job}-restored")
    result = await restore(dest, store, job)
    assert (result.manifest.id, result.skipped) == (m.id, [])
    assert checksums(start_restored(dest, started)) == sums


async def changed_after_pause(pg_factory: PgFactory, store: Store, job: str
                              ) -> tuple[Instance, Manifest, dict[str, str], dict[str, str]]:
    inst = cluster(pg_factory, job)
    fill(inst, rows=1000, tag="a")
    sums_a = checksums(inst)
    inst.stop()
    a = await take_snapshot(inst.datadir, store, job)
    inst.start()
    inst.psql("update known set tag = 'b'", database="job_alpha")
    sums_b = checksums(inst)
    inst.stop()
    return inst, a, sums_a, sums_b


async def test_a_failed_upload_leaves_no_snapshot_and_a_retry_completes(
        pg_factory: PgFactory, fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst, a, sums_a, sums_b = await changed_after_pause(pg_factory, fstore, "failed")
    failing = FailingStore(fstore, allow=1)
    with pytest.raises(StoreError, match="injected failure"):
        await take_snapshot(inst.datadir, failing, "failed")
    assert failing.failed >= 1
    await assert_still_latest(fstore, "failed", a, inst.datadir, pg_root, sums_a,
                              restored_instances)

    b = await take_snapshot(inst.datadir, fstore, "failed")
    dest = pg_root / unique("failed-retried")
    result = await restore(dest, fstore, "failed")
    assert result.manifest.id == b.id
    assert checksums(start_restored(dest, restored_instances)) == sums_b


async def test_a_cancelled_snapshot_leaves_no_snapshot(
        pg_factory: PgFactory, fstore: Store, pg_root: Path,
        restored_instances: list[Instance]) -> None:
    inst, a, sums_a, _sums_b = await changed_after_pause(pg_factory, fstore, "cancelled")
    stalling = StallingStore(fstore, allow=1)
    task = asyncio.create_task(take_snapshot(inst.datadir, stalling, "cancelled"))
    try:
        await asyncio.wait_for(stalling.stalled.wait(), 60)
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_still_latest(fstore, "cancelled", a, inst.datadir, pg_root, sums_a,
                              restored_instances)


async def test_a_pause_reads_only_the_chunks_whose_pages_changed(
        pg_factory: PgFactory, fstore: Store, pg_root: Path) -> None:
    """pgbench_accounts is 13 MB (14 chunks): an update of one row touches one page, so the
    next pause reads the chunk that page is in and not the others (its page LSNs say so),
    and the data restores the same. An unlogged table's pages carry no LSN: it is read
    whole whenever it changed."""
    inst = cluster(pg_factory, "cas-lsn")
    fill(inst, rows=1000)
    inst.psql("create unlogged table scratch as select g from generate_series(1, 200000) g",
              database="job_alpha")
    # every page hinted and checkpointed once, so that only what the test changes is new
    inst.psql("vacuum freeze", database="job_alpha")
    inst.psql("select pg_switch_wal()")
    inst.stop()
    await take_snapshot(inst.datadir, fstore, "lsn")
    inst.start()
    relpath = {t: inst.psql(f"select pg_relation_filepath('{t}')", database="job_alpha")
               for t in ("pgbench_accounts", "scratch")}
    inst.psql("update pgbench_accounts set filler = 'changed' where ctid = '(800,1)'",
              database="job_alpha")
    inst.psql("update scratch set g = -g where ctid = '(100,1)'", database="job_alpha")
    sums = checksums(inst)
    inst.psql("select pg_switch_wal()")  # as a pause does: the WAL read is then a page or two
    inst.stop()
    b = await take_snapshot(inst.datadir, fstore, "lsn")
    sizes = {t: (inst.datadir / p).stat().st_size for t, p in relpath.items()}
    accounts_chunks = -(-sizes["pgbench_accounts"] // (1 << 20))
    assert accounts_chunks >= 10
    # one accounts chunk, all of the unlogged table, its maps, pg_control, the WAL tail...
    assert b.extra["read_bytes"] < sizes["scratch"] + sizes["pgbench_accounts"] / 2, b.extra
    assert b.extra["read_bytes"] >= sizes["scratch"], b.extra
    restored = pg_root / unique("lsn-restore")
    await restore(restored, fstore, "lsn")
    started: list[Instance] = []
    try:
        assert checksums(start_restored(restored, started)) == sums
    finally:
        for i in started:
            i.stop_quietly()
