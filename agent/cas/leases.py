"""Leases: the collector never deletes an object a writer in flight may reference.

A pause finds most of its objects already stored and does not upload them
again; if the collector deleted one of those between the lookup and the
manifest, the manifest would reference a missing object. So, as restic's
locks do:

- a writer (pause, base backup, template) puts a *lease* before its first
  lookup and removes it after its manifest is written;
- the collector puts its *lock*, then waits until no live lease is left
  before deleting anything, and removes the lock when done;
- a writer that finds a live collector's lock takes its lease back and waits
  for the lock to go, so the collector is not starved by a stream of pauses.

Both sides write first and list second, so on a store with read-after-write
listing (S3, a file system) at least one of two that race sees the other.
A lease or lock carries its time in its key, so one listing says who is
live: a lease older than ``LEASE_TTL`` (its writer died; writers renew
theirs every ``LEASE_TTL / 4``) or a lock older than ``LOCK_TTL`` is
ignored. A writer whose lease may have lapsed (renewals failed) checks
every object its manifest references before counting it as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..store import Store, StoreError, put_bytes

log = logging.getLogger("jobmesh.agent.leases")

LOCKS_PREFIX = "_locks/"
# A lease is renewed every LEASE_TTL / 4 while its writer runs; one a killed writer left
# keeps collections waiting for at most LEASE_TTL.
LEASE_TTL = 120.0
LOCK_TTL = 120.0
POLL = 0.05


@dataclass(frozen=True)
class Entry:
    kind: str  # "lease" or "gc"
    at: float  # seconds since the epoch
    key: str


def _key(kind: str, at: float) -> str:
    return f"{LOCKS_PREFIX}{kind}-{int(at * 1000):013d}-{secrets.token_hex(4)}"


def parse(key: str) -> Entry | None:
    kind, _, rest = key.removeprefix(LOCKS_PREFIX).partition("-")
    ms, _, _ = rest.partition("-")
    if kind not in ("lease", "gc") or not ms.isdigit():
        return None
    return Entry(kind, int(ms) / 1000, key)


async def live(store: Store, now: float | None = None) -> list[Entry]:
    """Leases and locks not past their time to live, oldest first."""
    now = time.time() if now is None else now
    out = []
    for info in await store.list(LOCKS_PREFIX):
        e = parse(info.key)
        if e is not None and now - e.at < (LEASE_TTL if e.kind == "lease" else LOCK_TTL):
            out.append(e)
    return sorted(out, key=lambda e: (e.at, e.key))


class Lease:
    """``async with Lease(store, what):`` around a writer's lookups, uploads and manifest."""

    def __init__(self, store: Store, what: str, *, wait: float = LOCK_TTL) -> None:
        self.store = store
        self.what = what
        self.wait = wait
        self.key = ""
        self.renewed_at = 0.0  # monotonic time of the last write of the lease
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        deadline = time.monotonic() + self.wait
        while True:
            await self._put()
            if not any(e.kind == "gc" for e in await live(self.store)):
                break
            await self._drop()  # let the collector finish; it waits for leases, not us
            while any(e.kind == "gc" for e in await live(self.store)):
                if time.monotonic() > deadline:
                    raise StoreError(f"the store {self.store.url} has been locked by a garbage "
                                     f"collection for over {self.wait:.0f} s")
                await asyncio.sleep(POLL)
        self._renewer = asyncio.create_task(self._renew(), name=f"lease {self.what}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        with contextlib.suppress(StoreError):
            await self._drop()

    @property
    def lapsed(self) -> bool:
        """Whether the collector may have taken this lease for a dead writer's."""
        return time.monotonic() - self.renewed_at > LEASE_TTL / 2

    async def _put(self) -> None:
        key = _key("lease", time.time())
        await put_bytes(self.store, key, self.what.encode())
        old, self.key, self.renewed_at = self.key, key, time.monotonic()
        if old:
            await self.store.delete(old)

    async def _drop(self) -> None:
        if self.key:
            key, self.key = self.key, ""
            await self.store.delete(key)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL / 4)
            try:
                await self._put()
            except StoreError as exc:
                log.warning("cannot renew the lease of %s: %s", self.what, exc)


async def verify_referenced(exists: Callable[[str], Awaitable[bool]], names: set[str],
                            parallel: int = 32) -> list[str]:
    """The names among ``names`` that are not stored (empty: the manifest is whole)."""
    slots = asyncio.Semaphore(parallel)

    async def one(name: str) -> str | None:
        async with slots:
            return None if await exists(name) else name

    return sorted(n for n in await asyncio.gather(*(one(n) for n in names)) if n)


class CollectorLock:
    """The collector's exclusive lock: taken once no live lease is left."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.key = ""
        self.taken_at = 0.0

    async def acquire(self, wait: float) -> bool:
        """True once held; False (and nothing held) if leases stayed live for ``wait`` s or
        another collector holds the store."""
        self.key = _key("gc", time.time())
        await put_bytes(self.store, self.key, b"gc")
        deadline = time.monotonic() + wait
        while True:
            entries = await live(self.store)
            gcs = [e for e in entries if e.kind == "gc"]
            if gcs and gcs[0].key != self.key:
                await self.release()  # the older collector goes first
                return False
            if not any(e.kind == "lease" for e in entries):
                self.taken_at = time.monotonic()
                return True
            if time.monotonic() > deadline:
                await self.release()
                return False
            await asyncio.sleep(POLL)

    @property
    def expiring(self) -> bool:
        """Past half its time to live: writers will soon ignore it, so stop deleting."""
        return time.monotonic() - self.taken_at > LOCK_TTL / 2

    async def release(self) -> None:
        if self.key:
            key, self.key = self.key, ""
            with contextlib.suppress(StoreError):
                await self.store.delete(key)
