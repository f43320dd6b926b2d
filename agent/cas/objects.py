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
from dataclasses import dataclass

import zstandard

from ..store import NotFound, Store, get_bytes, put_bytes
from .keys import CorruptObject, KeySet

OBJECTS_PREFIX = "_objects/"
CHUNK_SIZE = 1 << 20  # 128 PostgreSQL pages; see the README's "Snapshot objects"
LEVEL = 1  # zstd: most of a page's gain at a fraction of level 3's time
MAX_OBJECT = CHUNK_SIZE + (CHUNK_SIZE >> 4) + 4096  # refuse a decompression bomb


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
    """Reads and writes a store's objects under one key set (thread-safe: no shared state
    but the key set)."""

    def __init__(self, store: Store, keys: KeySet) -> None:
        self.store = store
        self.keys = keys

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
        return await self.store.size(object_key(name)) is not None

    async def put(self, encoded: Encoded) -> int:
        """Store an encoded object; returns the bytes stored."""
        await put_bytes(self.store, object_key(encoded.name), encoded.blob)
        return len(encoded.blob)

    async def get(self, name: str) -> bytes:
        """The object's plaintext, verified; NotFound if it is not stored."""
        blob = await get_bytes(self.store, object_key(name))
        return await asyncio.to_thread(self.decode, name, blob)


__all__ = ["CHUNK_SIZE", "OBJECTS_PREFIX", "CorruptObject", "Encoded", "NotFound", "Objects",
           "name_of_key", "object_key"]
