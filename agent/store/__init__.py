"""Object stores for snapshots, WAL and dumps: ``file:///abs/path`` and ``s3://bucket/prefix``.

Every store streams: ``put`` consumes an async iterator of chunks and never
holds the whole object; ``get`` yields chunks. Writes are atomic: a reader
sees a whole object or none (a file is renamed into place; an S3 multipart
upload only exists once completed). Whether an object *counts* is decided
one level up, by its manifest (see ``manifest.py``).
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

CHUNK = 1 << 20


class StoreError(Exception):
    """A store operation failed for good (after retries); one line for the user."""


class NotFound(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class Stored:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


class Store(Protocol):
    url: str

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> Stored: ...

    # A small object, written only if no object has the key (S3: If-None-Match: *): False
    # when one had, and it is left as it was. Shared objects are written so: a writer adds
    # them, never replaces another's.
    async def put_new(self, key: str, data: bytes) -> bool: ...

    # An async generator (``async def`` with ``yield``): callers may ``aclose`` it to stop
    # a download early.
    def get(self, key: str) -> AsyncGenerator[bytes, None]: ...

    async def size(self, key: str) -> int | None: ...

    async def list(self, prefix: str) -> list[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    # Several keys at once: one request on S3 (DeleteObjects, up to 1,000 keys); missing
    # keys are no error.
    async def delete_many(self, keys: builtins.list[str]) -> None: ...

    async def close(self) -> None: ...


async def put_bytes(store: Store, key: str, data: bytes) -> Stored:
    async def one() -> AsyncIterator[bytes]:
        yield data

    return await store.put(key, one())


async def get_bytes(store: Store, key: str) -> bytes:
    return b"".join([chunk async for chunk in store.get(key)])


class Digest:
    """Size and sha256 of a stream, computed as it passes."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)
        self.size += len(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def make_private(store: Store, reader_gid: int | None = None) -> None:
    """A ``file://`` store's directory made ours alone (``FileStore.make_private``); an
    S3 store's access is its credentials' (``controller/storage/access.py``)."""
    from .file import FileStore

    if isinstance(store, FileStore):
        store.make_private(reader_gid)


def open_store(url: str, *, s3_endpoint: str | None = None) -> Store:
    """A store for a URL; raises StoreError with a clear message for a bad one."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise StoreError(f"bad store URL {url!r}: use file:///absolute/path")
        from .file import FileStore

        return FileStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"bad store URL {url!r}: use s3://bucket/prefix")
        try:
            from .s3 import S3Store
        except ModuleNotFoundError as exc:
            raise StoreError(f"s3:// stores need {exc.name}: pip install 'jobmesh[s3]'") from None
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint=s3_endpoint)
    raise StoreError(f"bad store URL {url!r}: expected file:///path or s3://bucket/prefix")
