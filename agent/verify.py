"""``verify``: re-download everything a job has in the store and check it.

Every object a manifest lists must have the size and sha256 the manifest
says; every content-addressed object a format 2 snapshot references must
open, decompress and hash back to its name; every archived WAL object must
be whole zstd frames. Orphaned objects (an upload that died) are reported
too, as what ``jobmesh store gc`` will remove. Problems are
returned as lines naming the object, never raised: one bad object must
not hide the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable

import zstandard

from .cas.keys import CorruptObject, load_keyring, store_key_from_env
from .cas.objects import Objects, object_key
from .inventory import full_key, gather_bounded, read_listing
from .manifest import job_prefix
from .store import Digest, NotFound, Store, StoreError
from .store.incomplete import abort_incomplete

INCOMPLETE_AFTER = 60.0  # seconds: younger ones may be uploads in progress


async def verify(store: Store, job: str) -> list[str]:
    """Re-download everything and check it; returns one line per problem (empty: all good)."""
    listing = await read_listing(store, job)
    problems = [f"{key}: unreadable manifest" for key in listing.unreadable]
    checks: list[Awaitable[str | None]] = []
    owners: dict[tuple[str, str], str] = {}  # (key id, object name) -> a snapshot using it
    for what, mans in (("snapshot", listing.snapshots), ("dump", listing.dumps)):
        for mid, man in mans.items():
            for entry in man.objects:
                checks.append(_check_object(store, f"{what} {mid}", full_key(job, entry.key),
                                            entry.size, entry.sha256))
            for name in man.object_names():
                owners.setdefault((man.key_id, name), f"{what} {mid}")
    if owners:
        keyring = await load_keyring(store, store_key_from_env(), create=False)
        for (key_id, name), owner in owners.items():
            checks.append(_check_cas(Objects(store, keyring.get(key_id)), name, owner))
    problems += [f"{info.key}: orphaned object ({info.size} bytes; `jobmesh store gc` "
                 "removes it)" for _, _, info in listing.orphans()]
    # Uploads that died mid-object: nothing lists them, nothing finishes them.
    if stale := await abort_incomplete(store, older_than=INCOMPLETE_AFTER, dry_run=True):
        problems.append(f"{store.url}: {stale} incomplete uploads older than "
                        f"{INCOMPLETE_AFTER:g} s (uploaders killed mid-object; `jobmesh "
                        "store gc` removes them after its grace period)")
    wal_prefix = f"{job_prefix(job)}wal/"
    for key in listing.objects:
        if key.startswith(wal_prefix) and key.endswith(".zst"):
            checks.append(_check_zstd(store, key))
    problems += [p for p in await gather_bounded(checks) if p]
    return problems


async def _check_object(store: Store, owner: str, key: str, size: int,
                        sha256: str) -> str | None:
    digest = Digest()
    try:
        async with contextlib.aclosing(store.get(key)) as chunks:
            async for chunk in chunks:
                digest.update(chunk)
    except NotFound:
        return f"{key}: missing (listed in {owner})"
    except StoreError as exc:
        return f"{key}: cannot read: {exc}"
    if digest.size != size:
        return f"{key}: {digest.size} bytes, {owner} says {size}"
    if digest.hexdigest() != sha256:
        return f"{key}: sha256 mismatch ({owner})"
    return None


async def _check_cas(objects: Objects, name: str, owner: str) -> str | None:
    try:
        await objects.get(name)
    except NotFound:
        return f"{object_key(name)}: missing (referenced by {owner})"
    except CorruptObject as exc:
        return f"{object_key(name)}: {exc} (referenced by {owner})"
    except StoreError as exc:
        return f"{object_key(name)}: cannot read: {exc}"
    return None


async def _check_zstd(store: Store, key: str) -> str | None:
    """A WAL object must be one or more complete zstd frames."""
    dec = zstandard.ZstdDecompressor()
    obj = dec.decompressobj()
    in_frame = False  # bytes of a frame were fed but its end was not seen yet
    seen = 0
    try:
        async with contextlib.aclosing(store.get(key)) as chunks:
            async for chunk in chunks:
                seen += len(chunk)
                while chunk:
                    obj.decompress(chunk)
                    in_frame = True
                    chunk = b""
                    if obj.eof:  # a frame ended; whatever follows is the next frame
                        chunk, obj, in_frame = obj.unused_data, dec.decompressobj(), False
    except NotFound:
        return None  # pruned since we listed it
    except StoreError as exc:
        return f"{key}: cannot read: {exc}"
    except zstandard.ZstdError as exc:
        return f"{key}: not valid zstd: {exc}"
    if seen == 0:
        return f"{key}: empty object"
    if in_frame:
        return f"{key}: truncated zstd frame"
    return None

