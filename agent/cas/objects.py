"""Content-addressed objects: immutable, named by a keyed hash of their plaintext, store-wide.

An object is one chunk of a file (``CHUNK_SIZE``, page-aligned) or a whole
small file, zstd-compressed and, in an encrypted store, sealed with
AES-256-GCM. It lives at ``_objects/<aa>/<name>``. Reading one checks it
end to end: it must open, decompress and hash back to its name, so a
damaged or swapped object is refused whatever the store says about it.

Sidecars only add objects; only the controller deletes them (``gc``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

import zstandard

from ..store import NotFound, Store, get_bytes
from .keys import CorruptObject, KeySet

OBJECTS_PREFIX = "_objects/"
CHUNK_SIZE = 1 << 20  # 128 PostgreSQL pages; see the README's "Snapshot objects"
LEVEL = 1  # zstd: most of a page's gain at a fraction of level 3's time
MAX_OBJECT = CHUNK_SIZE + (CHUNK_SIZE >> 4) + 4096  # refuse a decompression bomb


async def run_all(aws: Iterable[Awaitable[object]]) -> None:
    """Run them all at once; on the first failure cancel the rest and wait for them (no
    worker keeps writing after its caller gave up), then raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def object_key(name: str) -> str:
    return f"{OBJECTS_PREFIX}{name[:2]}/{name}"


def name_of_key(key: str) -> str | None:
    """The object name of a key under ``_objects/``, else None."""
    if not key.startswith(OBJECTS_PREFIX):
        return None
    name = key.rsplit("/", 1)[-1]
    return name if len(name) == 64 and key == object_key(name) else None


@dataclass(frozen=True)
class Encoded:
    name: str
    blob: bytes
    size: int  # plaintext bytes


class Objects:
    """Reads and writes a store's objects under one key set (``store_sync`` from several
    threads at once: set.add is atomic)."""

    def __init__(self, store: Store, keys: KeySet) -> None:
        self.store = store
        self.keys = keys
        self._touched: set[str] = set()

    # -- CPU work, for a worker thread ------------------------------------------------------

    def name(self, plain: bytes | memoryview) -> str:
        return self.keys.name(plain)

    def encode(self, plain: bytes | memoryview, name: str | None = None) -> Encoded:
        name = name or self.keys.name(plain)
        packed = zstandard.ZstdCompressor(level=LEVEL).compress(plain)
        return Encoded(name, self.keys.seal(name, packed), len(plain))

    def decode(self, name: str, blob: bytes) -> bytes:
        packed = self.keys.open(name, blob)
        try:
            plain = zstandard.ZstdDecompressor().decompress(packed, max_output_size=MAX_OBJECT)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"object {name[:16]}… is not valid zstd: {exc}") from exc
        if self.keys.name(plain) != name:
            raise CorruptObject(f"object {name[:16]}… does not hash to its name (damaged)")
        return plain

    # -- I/O ------------------------------------------------------------------------------

    async def exists(self, name: str) -> bool:
        found = await self.store.size(object_key(name)) is not None
        if found:
            self._touched.add(object_key(name))  # another writer's: see ``sync``
        return found

    def store_sync(self, plain: bytes | memoryview, name: str) -> int | None:
        """Store the object unless it is stored already, in the caller's thread, where the
        store can (file://): one job instead of a thread hop per step. Returns the bytes
        stored (0: it was there), or None: this store cannot, use ``exists`` and ``put``."""
        put_sync = getattr(self.store, "put_sync", None)
        size_sync = getattr(self.store, "size_sync", None)
        if put_sync is None or size_sync is None:
            return None
        key = object_key(name)
        # found or written: either way its directory entry is made durable by ``sync``
        # before a manifest names it (another writer's rename may not be yet)
        self._touched.add(key)
        if size_sync(key) is not None:
            return 0
        encoded = self.encode(plain, name)
        put_sync(key, encoded.blob, sync_dir=False)
        return len(encoded.blob)

    async def sync(self) -> None:
        """Before a manifest: the objects ``store_sync`` found or wrote are durable."""
        sync_dirs = getattr(self.store, "sync_dirs", None)
        if sync_dirs is not None and self._touched:
            keys, self._touched = sorted(self._touched), set()
            await asyncio.to_thread(sync_dirs, keys)

    async def put(self, encoded: Encoded) -> int:
        """Store an encoded object unless one is stored under its name (another writer's
        got there first: it is left as it is); returns the bytes stored (0: none)."""
        written = await self.store.put_new(object_key(encoded.name), encoded.blob)
        return len(encoded.blob) if written else 0

    async def get(self, name: str) -> bytes:
        """The object's plaintext, verified; NotFound if it is not stored."""
        blob = await get_bytes(self.store, object_key(name))
        return await asyncio.to_thread(self.decode, name, blob)


__all__ = ["CHUNK_SIZE", "OBJECTS_PREFIX", "CorruptObject", "Encoded", "NotFound", "Objects",
           "name_of_key", "object_key", "run_all"]
