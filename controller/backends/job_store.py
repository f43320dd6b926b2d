"""What the backends read and delete of a job in the store."""

from __future__ import annotations

import asyncio
import contextlib

from jobmesh.agent.manifest import (
    Manifest,
    ManifestError,
    job_prefix,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from jobmesh.agent.store import Store, StoreError, get_bytes


async def latest_snapshot(store: Store, job_id: str) -> Manifest | None:
    """The newest snapshot (pause or base backup) with a readable manifest, or None."""
    keys = [o.key for o in await store.list(f"{job_prefix(job_id)}snapshots/")]
    for sid in reversed(snapshot_ids_with_manifest(keys, job_id)):
        with contextlib.suppress(ManifestError, StoreError):
            return Manifest.from_json(await get_bytes(store, snapshot_manifest_key(job_id, sid)))
    return None


async def delete_job_objects(store: Store, job_id: str, parallel: int = 16) -> int:
    """Delete everything under the job's prefix (snapshots, WAL, dumps); returns how many."""
    objects = await store.list(job_prefix(job_id))
    slots = asyncio.Semaphore(parallel)

    async def one(key: str) -> None:
        async with slots:
            await store.delete(key)

    await asyncio.gather(*(one(o.key) for o in objects))
    return len(objects)
