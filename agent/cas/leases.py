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
ignored. A writer whose lease may have lapsed (renewals failed) takes it
again and checks every object its manifest references before writing it.

Writers never delete (their store credentials may not: README, "Scoped
store access"). A lease has an id; each renewal puts a new key with that id
(``lease-<ms>-<id>``), and releasing it puts ``done-<ms>-<id>``: a lease
with a ``done`` marker is not live. The collector, which may delete, sweeps
what is past its time to live (``sweep``).
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
    kind: str  # "lease", "done" (a lease released) or "gc"
    at: float  # seconds since the epoch
    key: str
    id: str  # a lease's, shared by its renewals and its done marker


def _key(kind: str, at: float, ident: str) -> str:
    return f"{LOCKS_PREFIX}{kind}-{int(at * 1000):013d}-{ident}"


def parse(key: str) -> Entry | None:
    kind, _, rest = key.removeprefix(LOCKS_PREFIX).partition("-")
    ms, _, ident = rest.partition("-")
    if kind not in ("lease", "done", "gc") or not ms.isdigit() or not ident:
        return None
    return Entry(kind, int(ms) / 1000, key, ident)


def _ttl(kind: str) -> float:
    return LOCK_TTL if kind == "gc" else LEASE_TTL


async def live(store: Store, now: float | None = None) -> list[Entry]:
    """Leases (the newest key of each, not released) and locks not past their time to
    live, oldest first."""
    now = time.time() if now is None else now
    entries = [e for info in await store.list(LOCKS_PREFIX) if (e := parse(info.key))]
    released = {e.id for e in entries if e.kind == "done"}
    newest: dict[tuple[str, str], Entry] = {}
    for e in entries:
        if e.kind == "done" or (e.kind == "lease" and e.id in released):
            continue
        if now - e.at < _ttl(e.kind):
            k = (e.kind, e.id)
            if k not in newest or newest[k].at < e.at:
                newest[k] = e
    return sorted(newest.values(), key=lambda e: (e.at, e.key))


async def sweep(store: Store, now: float | None = None) -> list[str]:
    """The collector's cleanup of ``_locks/``: deletes released leases, what is past its
    time to live, and done markers older than a lease's time to live (every key of their
    lease is older still, so dead without them); returns the deleted keys."""
    now = time.time() if now is None else now
    entries = [e for info in await store.list(LOCKS_PREFIX) if (e := parse(info.key))]
    released = {e.id for e in entries if e.kind == "done"}
    doomed = sorted(e.key for e in entries if now - e.at >= _ttl(e.kind)
                    or (e.kind == "lease" and e.id in released))
    if doomed:
        await store.delete_many(doomed)
    return doomed


class Lease:
    """``async with Lease(store, what):`` around a writer's lookups, uploads and manifest."""

    def __init__(self, store: Store, what: str, *, wait: float = LOCK_TTL) -> None:
        self.store = store
        self.what = what
        self.wait = wait
        self.id = ""  # of the lease held, if any
        self.key = ""  # its newest renewal
        self.renewed_at = 0.0  # monotonic time of the last write of the lease
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        await self.take()
        self._renewer = asyncio.create_task(self._renew(), name=f"lease {self.what}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        with contextlib.suppress(StoreError):
            await self._drop()

    async def take(self) -> None:
        """Hold a lease no collector's lock predates (waiting for the collector, if one
        runs, to finish); also how a writer whose lease lapsed takes it again."""
        deadline = time.monotonic() + self.wait
        while True:
            await self._put()
            if not any(e.kind == "gc" for e in await live(self.store)):
                return
            await self._drop()  # let the collector finish; it waits for leases, not us
            while any(e.kind == "gc" for e in await live(self.store)):
                if time.monotonic() > deadline:
                    raise StoreError(f"the store {self.store.url} has been locked by a garbage "
                                     f"collection for over {self.wait:.0f} s")
                await asyncio.sleep(POLL)

    @property
    def lapsed(self) -> bool:
        """Whether the collector may have taken this lease for a dead writer's."""
        return time.monotonic() - self.renewed_at > LEASE_TTL / 2

    async def _put(self) -> None:
        self.id = self.id or secrets.token_hex(6)
        key = _key("lease", time.time(), self.id)
        await put_bytes(self.store, key, self.what.encode())
        self.key, self.renewed_at = key, time.monotonic()

    async def _drop(self) -> None:
        if self.id:
            ident, self.id, self.key = self.id, "", ""
            await put_bytes(self.store, _key("done", time.time(), ident), b"")

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
        self.key = _key("gc", time.time(), secrets.token_hex(6))
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
