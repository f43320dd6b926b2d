"""Putting one snapshot's files into PGDATA, verified: format 2 by delta (``cas``), format 1
from its tar (every byte checked against the manifest's sha256 as it streams).

``restore.py`` decides which snapshot and what recovery follows; this module only
fetches, and raises ``Unusable`` for a snapshot that cannot be (PGDATA is then
dirty: the caller wipes it before trying another).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from .cas import Keyring, Objects
from .cas.download import restore_files
from .cas.keys import CorruptObject, load_keyring, store_key_from_env
from .errors import AgentError
from .manifest import Manifest, ManifestError, job_prefix, snapshot_data_key, snapshot_manifest_key
from .postgres import give_to_postgres
from .progress import Progress
from .store import Digest, NotFound, Store, StoreError, get_bytes
from .tarstream import extract_tar_zst, wipe

log = logging.getLogger("jobmesh.agent.restore")

ProgressFor = Callable[[Manifest, int], Progress]  # a bar for (snapshot, compressed size)


class Unusable(Exception):
    """This snapshot cannot be restored (missing or corrupt object, bad manifest)."""


def _data_key(job: str, m: Manifest) -> tuple[str, int, str]:
    """The full key, size and sha256 of a snapshot's archive."""
    relative = snapshot_data_key(job, m.id)[len(job_prefix(job)):]
    for o in m.objects:
        if o.key in (relative, f"{job_prefix(job)}{relative}"):
            return snapshot_data_key(job, m.id), o.size, o.sha256
    raise Unusable(f"{snapshot_manifest_key(job, m.id)} lists no {relative}")


# Key files never change once written: one read per store and store key, per process.
_keyrings: dict[tuple[str, bytes | None], Keyring] = {}


async def _objects(store: Store, m: Manifest) -> Objects:
    secret = store_key_from_env()
    keyring = _keyrings.get((store.url, secret))
    if keyring is None or m.key_id not in keyring.by_id:
        keyring = _keyrings[(store.url, secret)] = await load_keyring(store, secret,
                                                                      create=False)
    return Objects(store, keyring.get(m.key_id))


async def fetch_snapshot(pgdata: Path, store: Store, job: str, m: Manifest,
                 progress: ProgressFor | Progress) -> int:
    """Put one snapshot into PGDATA, verifying it; raises Unusable (PGDATA dirty)."""
    if m.chunked:
        restored = await _fetch_chunked(pgdata, store, m, progress)
    else:
        restored = await _fetch_tar(pgdata, store, job, m, progress)
    label = m.extra.get("backup_label") if m.kind == "base" else None
    if label:
        await _fetch_label(pgdata, store, job, m, str(label))
    return restored


async def _fetch_chunked(pgdata: Path, store: Store, m: Manifest,
                         progress: ProgressFor | Progress) -> int:
    try:
        objects = await _objects(store, m)
    except StoreError as exc:
        raise Unusable(str(exc)) from exc
    own_bar = not isinstance(progress, Progress)
    bar = progress if isinstance(progress, Progress) else progress(m, m.uncompressed_size)
    try:
        stats = await restore_files(objects, pgdata, m, progress=bar)
    except (NotFound, CorruptObject) as exc:
        if own_bar:
            bar.finish("failed")
        how = "missing" if isinstance(exc, NotFound) else "damaged"
        raise Unusable(f"an object it lists is {how}: {exc}") from exc
    except BaseException:
        if own_bar:
            bar.finish("failed")
        raise
    if own_bar:
        bar.finish(f"{stats.written_bytes / 1e6:,.1f} MB written, {stats.reused_files} of "
                   f"{stats.files} files reused")
    log.info("restored snapshot %s by delta: %d files, %d reused, %d objects fetched "
             "(%.1f MB written, %.1f MB hashed)", m.id, stats.files, stats.reused_files,
             stats.fetched_objects, stats.written_bytes / 1e6, stats.hashed_bytes / 1e6)
    return stats.written_bytes


async def _fetch_tar(pgdata: Path, store: Store, job: str, m: Manifest,
                     progress: ProgressFor | Progress) -> int:
    await asyncio.to_thread(wipe, pgdata)  # a delta restore's base is of no use to a tar
    key, size, sha256 = _data_key(job, m)
    stored_size = await store.size(key)
    if stored_size is None:
        raise Unusable(f"object {key} is missing")
    if stored_size != size:
        raise Unusable(f"object {key} is {stored_size} bytes, its manifest says {size}")
    if isinstance(progress, Progress):
        restored = await _download(pgdata, store, key, size, sha256, progress)
    else:
        bar = progress(m, size)
        try:
            restored = await _download(pgdata, store, key, size, sha256, bar)
        except BaseException:
            bar.finish("failed")
            raise
        bar.finish(f"{restored / 1e6:,.1f} MB of PGDATA")
    return restored


async def _download(pgdata: Path, store: Store, key: str, size: int, sha256: str,
                    progress: Progress) -> int:
    digest = Digest()

    async def verified() -> AsyncGenerator[bytes, None]:
        async for chunk in store.get(key):
            digest.update(chunk)
            progress.advance(len(chunk))
            yield chunk

    stream = verified()
    failure: AgentError | None = None
    try:
        restored = await extract_tar_zst(stream, pgdata)
    except AgentError as exc:  # corrupt or hostile archive: is the object itself damaged?
        failure = exc
        async for _ in stream:
            pass  # finish the download so the checksum can say
    except NotFound as exc:
        raise Unusable(f"object {key} disappeared during the download") from exc
    finally:
        await stream.aclose()
    _verify(key, digest, size, sha256)
    if failure is not None:
        raise AgentError(f"cannot restore {key}: {failure}") from failure
    return restored


async def _fetch_label(pgdata: Path, store: Store, job: str, m: Manifest, rel: str) -> None:
    """A base backup's backup_label is its own object (pg_backup_stop returns it only
    after the archive is written); recovery starts from the checkpoint it names."""
    try:
        entry = m.object(rel)
    except ManifestError as exc:
        raise Unusable(str(exc)) from exc
    key = f"{job_prefix(job)}{rel}"
    try:
        data = await get_bytes(store, key)
    except NotFound as exc:
        raise Unusable(f"object {key} is missing") from exc
    digest = Digest()
    digest.update(data)
    _verify(key, digest, entry.size, entry.sha256)
    await asyncio.to_thread(_write_owned, pgdata / "backup_label", data)


def _verify(key: str, digest: Digest, size: int, sha256: str) -> None:
    if digest.size != size or digest.hexdigest() != sha256:
        raise Unusable(f"object {key} failed verification: sha256 {digest.hexdigest()[:16]}… "
                        f"({digest.size} bytes), manifest says {sha256[:16]}… ({size} bytes)")


def _write_owned(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)
    give_to_postgres(path)


