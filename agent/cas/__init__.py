"""Snapshots as content-addressed objects (manifest format 2).

``keys`` names objects (and seals them), ``objects`` reads and writes one,
``upload`` sends a directory's missing objects, ``download`` restores a
manifest into a directory by delta, ``hashcache`` remembers what local files
hold, and ``leases`` keeps the collector away from writers in flight.
``write_snapshot`` is the one way a snapshot is written: under a lease, its
objects first and its manifest last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..errors import AgentError
from ..manifest import Manifest, snapshot_manifest_key
from ..progress import Progress
from ..store import Store, put_bytes
from .hashcache import HashCache, read_cache, write_cache
from .keys import Keyring, KeySet, load_keyring, store_key_from_env
from .leases import Lease, verify_referenced
from .objects import CHUNK_SIZE, Objects
from .upload import Tree, UploadStats, upload_files

Finish = Callable[[Tree, UploadStats, KeySet], Awaitable[Manifest]]


async def keyring_for(store: Store) -> Keyring:
    """The store's keys, with the store key from the environment (if any)."""
    return await load_keyring(store, store_key_from_env())


async def write_snapshot(store: Store, job: str, directory: Path,
                         exclude: Callable[[str], bool], finish: Finish, *,
                         use_cache: bool = True, zero_past: dict[str, int] | None = None,
                         progress: Progress | None = None,
                         keyring: Keyring | None = None,
                         lsn_trusted: bool = False) -> tuple[Manifest, UploadStats, HashCache]:
    """Upload ``directory``'s missing objects, then the manifest ``finish`` makes of them.

    Returns the stored manifest, what the upload cost, and a hash cache of the
    files as read (the caller writes it beside them when they will not change).
    ``lsn_trusted``: see ``upload.upload_files`` (only for a stopped cluster).
    """
    keyring = keyring or await keyring_for(store)
    keys = keyring.current
    objects = Objects(store, keys)
    async with Lease(store, f"snapshot of {job}") as lease:
        cache = await _cache(directory, keys.id) if use_cache else None
        known: set[str] = set()
        # the objects of the cache's source are stored while its manifest is (and we
        # hold a lease, so the collector cannot remove them meanwhile)
        if (cache is not None and cache.source is not None
                and await store.size(snapshot_manifest_key(*cache.source)) is not None):
            known = {n for _, _, names in cache.files.values() for n in names}
        tree, stats, new_cache = await upload_files(
            objects, directory, exclude, cache=cache, known=known, zero_past=zero_past,
            progress=progress, lsn_trusted=lsn_trusted)
        manifest = await finish(tree, stats, keys)
        await objects.sync()
        if lease.lapsed:  # the collector may have taken us for dead: hold the lease again
            await lease.take()  # (no collection runs from here on), then check
            missing = await verify_referenced(objects.exists, manifest.object_names())
            if missing:
                raise AgentError(f"snapshot {manifest.id} lost {len(missing)} objects to a "
                                 "garbage collection while its lease had lapsed; retry it")
        await put_bytes(store, snapshot_manifest_key(job, manifest.id), manifest.to_json())
    new_cache.source = (job, manifest.id)
    return manifest, stats, new_cache


async def _cache(directory: Path, key_id: str) -> HashCache | None:
    return await asyncio.to_thread(read_cache, directory, key_id)


__all__ = ["CHUNK_SIZE", "HashCache", "Keyring", "Objects", "Tree", "UploadStats",
           "keyring_for", "write_cache", "write_snapshot"]
