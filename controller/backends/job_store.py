"""What the backends read and delete of a job in the store, and how a pause is confirmed there."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from jobmesh.agent.fence import Fenced
from jobmesh.agent.manifest import (
    Manifest,
    ManifestError,
    job_prefix,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from jobmesh.agent.store import Store, StoreError, get_bytes, put_bytes

from ..catalog.models import Job
from ..core.backend import BackendError, PermanentError, Stopped


def stale_generation(exc: Fenced) -> PermanentError:
    """The catalog handed out a generation older than one the store has seen claimed:
    another controller runs this job, or the catalog was restored from an old backup.
    Retrying would only creep past the fence, so it is for the user to look."""
    return PermanentError(f"generation {exc.generation} from the catalog is older than "
                          f"generation {exc.newer}, claimed in the store: is another "
                          f"controller running this job, or was the catalog restored from an "
                          f"old backup?")


async def latest_snapshot(store: Store, job_id: str) -> Manifest | None:
    """The newest snapshot (pause or base backup) with a readable manifest, or None."""
    return (await _newest_snapshot(store, job_id))[0]


async def snapshot_to_restore(store: Store, job_id: str) -> Manifest:
    """The snapshot a resume or a recovery restores: the newest readable one.

    PermanentError when there is none (or every manifest is damaged): the job's data
    is not in this store (lost, or the controller was pointed at another store), and
    retrying cannot change that. A store that fails to list or read is an ordinary,
    retried, BackendError.
    """
    manifest, unread = await _newest_snapshot(store, job_id)
    if manifest is not None:
        return manifest
    if unread is not None:
        raise BackendError(f"cannot read the snapshots of job {job_id} in {store.url}: "
                           f"{unread}")
    raise PermanentError(f"job {job_id} has no snapshot to restore from in {store.url}")


async def _newest_snapshot(store: Store, job_id: str) -> tuple[Manifest | None,
                                                                StoreError | None]:
    """The newest snapshot with a readable manifest; else None, and the last error of a
    manifest that could not be read (None: there were none, or only damaged ones)."""
    keys = [o.key for o in await store.list(f"{job_prefix(job_id)}snapshots/")]
    unread: StoreError | None = None
    for sid in reversed(snapshot_ids_with_manifest(keys, job_id)):
        try:
            raw = await get_bytes(store, snapshot_manifest_key(job_id, sid))
            return Manifest.from_json(raw), None
        except ManifestError:
            continue  # damaged: an older snapshot may do
        except StoreError as exc:
            unread = exc
    return None, unread


async def delete_job_objects(store: Store, job_id: str, parallel: int = 16) -> int:
    """Delete everything under the job's prefix (snapshots, WAL, dumps); returns how many."""
    objects = await store.list(job_prefix(job_id))
    slots = asyncio.Semaphore(parallel)

    async def one(key: str) -> None:
        async with slots:
            await store.delete(key)

    await asyncio.gather(*(one(o.key) for o in objects))
    return len(objects)


async def stored_pause(store: Store, job_id: str) -> Stopped | None:
    """The pause, if the job's latest snapshot is a pause snapshot: what a pause retried
    after the instance was removed answers (the snapshot was the pause)."""
    m = await latest_snapshot(store, job_id)
    return stopped(m) if m is not None and m.kind == "pause" else None


async def confirm_pause(store: Store, job_id: str, pause: Manifest) -> Stopped:
    """The agent's answer to a pause, once its manifest is seen in the store: only then
    may the instance (and its local copy of the data) go."""
    if await store.size(snapshot_manifest_key(job_id, pause.id)) is None:
        raise BackendError(f"the agent answered pause snapshot {pause.id}, but its manifest "
                           f"is not in {store.url}")
    return stopped(pause)


def stopped(pause: Manifest) -> Stopped:
    """The reconciler's record of a pause: the manifest (as stored) and the bytes uploaded."""
    return Stopped(pause, pause.stored_size)


@dataclass(frozen=True)
class Rewind:
    at: str  # ISO 8601
    id: str


def _rewind_key(job_id: str, rid: str) -> str:
    return f"{job_prefix(job_id)}rewinds/{rid}"


async def pending_rewind(store: Store, job: Job) -> Rewind | None:
    """The rewind the job's spec asks of its next resume (``api/rewind.py``), unless the
    store says it was done. It is marked done once PostgreSQL runs on the rewound data and
    before the job is announced as running, so no client can write in between: a crash
    in between only repeats the rewind, losing nothing."""
    raw = job.spec.get("rewind")
    if not isinstance(raw, dict) or not isinstance(raw.get("at"), str) \
            or not isinstance(raw.get("id"), str):
        return None
    if await store.size(_rewind_key(job.id, raw["id"])) is not None:
        return None
    return Rewind(raw["at"], raw["id"])


async def rewind_done(store: Store, job: Job, rewind: Rewind) -> None:
    await put_bytes(store, _rewind_key(job.id, rewind.id), f"{rewind.at}\n".encode())
