"""The controller's garbage collector against real stores (file:// and moto's S3): retention,
store-wide collection, its race with writers, and uploads that died.

Snapshots here are of plain directories written with ``cas.write_snapshot``, the path
every pause and base backup takes (lease, lookups, uploads, manifest last), so that a
race can be run many times in seconds; PostgreSQL pauses are in tests/integration/agent.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobmesh.agent.cas import CHUNK_SIZE, Tree, UploadStats, keyring_for, write_snapshot
from jobmesh.agent.cas.keys import KeySet
from jobmesh.agent.cas.leases import LOCKS_PREFIX, live, parse, verify_referenced
from jobmesh.agent.cas.objects import OBJECTS_PREFIX, Objects, name_of_key
from jobmesh.agent.manifest import Manifest, new_id, now_iso, snapshot_manifest_key
from jobmesh.agent.store import Store
from jobmesh.agent.verify import verify
from jobmesh.controller.storage.gc import Collector, usage
from jobmesh.controller.storage.retention import Retention, kept
from tests.support.stores import StoreSpec

pytestmark = pytest.mark.timeout(180)
KEEP = Retention(keep_pauses=2, pitr_window=0)  # the newest two, and no window


def fill(root: Path, seed: int, files: int = 12) -> None:
    """Files of random bytes: half the same for every seed (shared), half its own."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        rng = random.Random(i if i % 2 == 0 else seed * 1000 + i)
        size = CHUNK_SIZE + 4096 if i == 0 else 8192 * (1 + i % 3)
        (root / f"f{i}").write_bytes(rng.randbytes(size))


async def snap(store: Store, job: str, directory: Path, kind: str = "pause",
               at: datetime | None = None) -> Manifest:
    sid = new_id(at)

    async def finish(tree: Tree, stats: UploadStats, keys: KeySet) -> Manifest:
        return Manifest(kind=kind, id=sid, job=job, created_at=now_iso(), objects=[],  # type: ignore[arg-type]
                        files=tree.files, dirs=tree.dirs, key_id=keys.id,
                        chunk_size=CHUNK_SIZE, uncompressed_size=stats.bytes,
                        extra={"new_objects": stats.new_objects,
                               "end_time": (at or datetime.now(UTC)).isoformat()})

    manifest, _, _ = await write_snapshot(store, job, directory, lambda _rel: False, finish,
                                          use_cache=False)
    return manifest


async def object_names(store: Store) -> set[str]:
    return {n for o in await store.list(OBJECTS_PREFIX) if (n := name_of_key(o.key))}


async def missing(store: Store, m: Manifest) -> list[str]:
    objects = Objects(store, (await keyring_for(store)).get(m.key_id))
    return await verify_referenced(objects.exists, m.object_names())


async def test_retention_keeps_the_newest_pauses_and_collection_only_the_unreferenced(
        store: Store, tmp_path: Path) -> None:
    snaps = []
    for seed in range(4):
        fill(tmp_path / "d", seed)
        snaps.append(await snap(store, "alpha", tmp_path / "d"))
    fill(tmp_path / "b", 99)
    other = await snap(store, "beta", tmp_path / "b")  # shares the even files with alpha's
    before = await object_names(store)
    report = await Collector(store).collect({"alpha": KEEP}, default=Retention(keep_pauses=5),
                                            only=["alpha"])
    assert report.dropped_snapshots == [f"alpha/{m.id}" for m in snaps[:2]]
    after = await object_names(store)
    wanted = set().union(*(m.object_names() for m in [*snaps[2:], other]))
    assert after == wanted  # exactly: nothing referenced went, nothing unreferenced stayed
    assert report.deleted_objects == len(before - after) > 0
    for m in [*snaps[2:], other]:
        assert await missing(store, m) == []
    assert await store.size(snapshot_manifest_key("alpha", snaps[0].id)) is None
    assert await verify(store, "alpha") == []
    # what each job holds: the objects only it references, and those it shares
    use = await usage(Collector(store))
    assert use["alpha"].snapshots == 2 and use["beta"].snapshots == 1
    assert use["alpha"].shared == use["beta"].shared > 0
    assert use["alpha"].unique > 0


def test_the_window_keeps_what_replays_to_any_moment_of_it() -> None:
    now = datetime(2026, 12, 2, 12, tzinfo=UTC)

    def snapshot(kind: str, ago: timedelta) -> Manifest:
        at = now - ago
        return Manifest(kind=kind, id=new_id(at), job="j", created_at=at.isoformat(),  # type: ignore[arg-type]
                        objects=[], extra={"end_time": at.isoformat()} if kind == "base" else {})

    bases = [snapshot("base", timedelta(hours=h)) for h in (30, 26, 20, 3)]
    pauses = [snapshot("pause", timedelta(minutes=m)) for m in (50, 40, 30, 20, 10)]
    every = {m.id: m for m in sorted([*bases, *pauses], key=lambda m: m.id)}
    keep = kept(every, Retention(keep_pauses=3, pitr_window=24 * 3600), now)
    # 26 h ago is what 24 h ago replays from; the later base backups shorten replays
    assert keep == {m.id for m in [*bases[1:], *pauses[-3:]]}
    # a job younger than its window keeps its oldest snapshot, whatever its kind
    young = {m.id: m for m in pauses}
    assert kept(young, Retention(keep_pauses=2, pitr_window=3600), now) == {
        pauses[0].id, pauses[-2].id, pauses[-1].id}
    # without a window, only the newest K pauses and the newest base backup
    assert kept(every, Retention(keep_pauses=1, pitr_window=0), now) == {
        bases[-1].id, pauses[-1].id}
    # a pinned snapshot stays until its pin expires
    pinned = {pauses[0].id: (now + timedelta(hours=1)).timestamp(),
              pauses[1].id: (now - timedelta(hours=1)).timestamp()}
    keep = kept(young, Retention(keep_pauses=1, pitr_window=0), now, pinned)
    assert keep == {pauses[0].id, pauses[-1].id}


async def test_collection_never_removes_what_a_concurrent_pause_reuses(
        store: Store, tmp_path: Path) -> None:
    """A pause finds old, unreferenced objects already stored and does not upload them
    again, while a collection that found them unreferenced runs: whichever goes first,
    the new manifest's objects are all stored afterwards. Raced many times, with the
    collection started at varying moments of the pause."""
    rng = random.Random(7)
    collector = Collector(store, lock_wait=30)
    for round_ in range(24):
        directory = tmp_path / f"d{round_}"
        fill(directory, round_)
        old = await snap(store, "racer", directory)
        await store.delete(snapshot_manifest_key("racer", old.id))  # all garbage now
        delay = rng.uniform(0, 0.05)

        async def collect_later(delay: float = delay) -> None:
            await asyncio.sleep(delay)  # a moment inside the pause, not a wait for an event
            await collector.collect({}, default=KEEP, only=[])

        new, _ = await asyncio.gather(snap(store, "racer", directory), collect_later())
        assert new.object_names() == old.object_names()
        assert await missing(store, new) == [], f"round {round_} (delay {delay:.3f} s)"
        await store.delete(snapshot_manifest_key("racer", new.id))
    assert await live(store) == []  # every lease and lock released
    await collector.collect({}, default=KEEP, only=[])
    assert await object_names(store) == set()
    # writers do not delete; the collection swept their released leases, and keeps only
    # the done markers (until a lease's time to live has passed)
    left = [parse(o.key) for o in await store.list(LOCKS_PREFIX)]
    assert left and {e.kind for e in left if e} == {"done"} and None not in left


_UPLOADER = """
import asyncio, sys
from jobmesh.agent.store import open_store

async def main():
    store = open_store(sys.argv[1])
    async def chunks():
        yield b"x" * 65536
        print("uploading", flush=True)
        await asyncio.sleep(3600)
    await store.put("_objects/ab/" + "ab" * 32, chunks())

asyncio.run(main())
"""


def _kill_mid_upload(url: str) -> None:
    """An uploader killed with SIGKILL once its object is half sent."""
    proc = subprocess.Popen([sys.executable, "-c", _UPLOADER, url],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "uploading"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_an_upload_killed_mid_object_is_reported_then_collected_after_the_grace(
        file_store: StoreSpec) -> None:
    assert file_store.root is not None
    await asyncio.to_thread(_kill_mid_upload, file_store.url)
    partial = list(file_store.root.rglob(".*.partial"))
    assert len(partial) == 1, partial
    store = file_store.open()
    try:
        collector = Collector(store, grace=600)
        assert (await collector.collect({}, default=KEEP)).incomplete == 0  # within the grace
        assert partial[0].exists()
        old = time.time() - 700
        os.utime(partial[0], (old, old))
        assert any("incomplete uploads" in p for p in await verify(store, "any"))
        assert (await collector.collect({}, default=KEEP)).incomplete == 1
        assert not partial[0].exists()
        assert await verify(store, "any") == []
    finally:
        await store.close()
