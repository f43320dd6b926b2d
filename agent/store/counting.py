"""A store that counts what is sent to it: requests by kind, and bytes uploaded.

``agent serve`` wraps its store in one, so ``/metrics`` says what a job costs
in the store (``jobmesh_agent_store_requests_total``,
``jobmesh_agent_store_bytes_sent_total``). A ``put`` counts as one request
(an S3 multipart upload of more than 16 MiB is several; only base backups
and snapshots are that large), ``delete_many`` as one per 1,000 keys.
"""

from __future__ import annotations

import builtins
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from . import ObjectInfo, Store, Stored


class CountingStore:
    def __init__(self, inner: Store,
                 on_request: Callable[[str, int, int], None] | None = None) -> None:
        """``on_request(op, requests, bytes_sent)`` is called for every request made."""
        self.inner = inner
        self.url = inner.url
        self.endpoint = getattr(inner, "endpoint", None)  # restore_command needs it (S3)
        self.requests: Counter[str] = Counter()
        self.bytes_sent = 0
        self._on_request = on_request

    def _count(self, op: str, sent: int = 0, n: int = 1) -> None:
        self.requests[op] += n
        self.bytes_sent += sent
        if self._on_request is not None:
            self._on_request(op, n, sent)

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        stored = await self.inner.put(key, chunks)
        self._count("put", stored.size)
        return stored

    async def put_new(self, key: str, data: bytes) -> bool:
        written = await self.inner.put_new(key, data)
        self._count("put", len(data))  # (sent either way)
        return written

    async def get(self, key: str) -> AsyncGenerator[bytes, None]:
        self._count("get")
        async for chunk in self.inner.get(key):
            yield chunk

    async def size(self, key: str) -> int | None:
        self._count("head")
        return await self.inner.size(key)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        self._count("list")
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        self._count("delete")
        await self.inner.delete(key)

    async def delete_many(self, keys: builtins.list[str]) -> None:
        if keys:
            self._count("delete", n=(len(keys) + 999) // 1000)
            await self.inner.delete_many(keys)

    async def close(self) -> None:
        await self.inner.close()
