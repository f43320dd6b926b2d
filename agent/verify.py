"""``verify``: re-download everything a job has in the store and check it.

Every object a manifest lists must have the size and sha256 the manifest
says; every archived WAL object must be whole zstd frames. Problems are
returned as lines naming the object, never raised: one bad object must
not hide the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable

import zstandard

from .inventory import full_key, gather_bounded, read_listing
from .manifest import job_prefix
from .store import Digest, NotFound, Store, StoreError


async def verify(store: Store, job: str) -> list[str]:
    """Re-download everything and check it; returns one line per problem (empty: all good)."""
    listing = await read_listing(store, job)
    problems = [f"{key}: unreadable manifest" for key in listing.unreadable]
    checks: list[Awaitable[str | None]] = []
    for what, mans in (("snapshot", listing.snapshots), ("dump", listing.dumps)):
        for mid, man in mans.items():
            for entry in man.objects:
                checks.append(_check_object(store, f"{what} {mid}", full_key(job, entry.key),
                                            entry.size, entry.sha256))
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

