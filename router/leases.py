"""A job's ``max_connections`` across every router: slots leased from the catalog.

Each router process (each worker) holds a lease of some of a job's slots in the
catalog (``jobmesh_lease_slots``: the sum of live leases never passes the limit).
A connect takes a leased slot in memory; only when none is free does the router
ask the catalog for more: its slots in use, plus a little headroom, so a burst
of connects costs one round trip, not one each. In the background every lease
is renewed (``renew`` seconds, well inside its ``ttl``) and shrunk to what is
in use plus the headroom; headroom yields to need: while another router is short
of slots it needs, a renewal keeps only what is in use, so a slot one router
freed goes to the other within ``renew`` seconds. A router that dies
stops renewing: its lease lapses after ``ttl`` and the others may take its
slots. While the catalog cannot be reached, a router keeps the slots it leased
and refuses connects beyond them: the limit holds, whatever fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from jobmesh.errors import one_line

log = logging.getLogger(__name__)

TTL = 30.0  # s a lease lives unless renewed
RENEW = 10.0  # s between renewals
SHRINK_AFTER = 1.0  # s after a release, unused slots beyond the headroom are given back


class LeaseCatalog(Protocol):
    async def lease_slots(self, job_id: str, router_id: str, need: int, want: int,
                          ttl: float) -> int: ...


def router_id() -> str:
    """Unique per router process: host, pid and a random part (pids repeat across pods)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def headroom(limit: int) -> int:
    """Slots leased beyond those in use: a tenth of the limit, from 1 to 8."""
    return max(1, min(8, limit // 10))


@dataclass(frozen=True, slots=True)
class Leased:
    """A session's slot of a leased job (what ``Router`` releases when it ends)."""

    job_id: str


class Unreachable(Exception):
    """The catalog did not answer a lease: only slots already leased may be used."""


class Leases:
    def __init__(self, catalog: LeaseCatalog, *, ttl: float = TTL, renew: float = RENEW,
                 errors: tuple[type[BaseException], ...] = (OSError,),
                 me: str | None = None) -> None:
        self.catalog = catalog
        self.ttl, self.renew = ttl, renew
        self.errors: tuple[type[BaseException], ...] = (*errors, TimeoutError)
        self.me = me or router_id()
        self.leased: Counter[str] = Counter()
        self.used: Counter[str] = Counter()
        self.limits: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._shrinks: dict[str, asyncio.TimerHandle] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renewing())

    async def close(self) -> None:
        """Give every lease back (best effort: a lease not given back lapses anyway)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for handle in self._shrinks.values():
            handle.cancel()
        for job_id in [j for j, n in self.leased.items() if n]:
            with contextlib.suppress(*self.errors):
                async with asyncio.timeout(2):
                    await self.catalog.lease_slots(job_id, self.me, 0, 0, self.ttl)

    async def acquire(self, job_id: str, limit: int) -> str | None:
        """A slot of ``job_id`` (its token), or None when the job's limit is reached across
        the routers. Raises Unreachable when more slots are needed and the catalog is down."""
        self.limits[job_id] = limit
        if self.used[job_id] < self.leased[job_id]:
            self.used[job_id] += 1
            return job_id
        async with self._locks.setdefault(job_id, asyncio.Lock()):
            if self.used[job_id] >= self.leased[job_id]:
                need = self.used[job_id] + 1
                await self._lease(job_id, need, min(limit, need + headroom(limit)))
            if self.used[job_id] >= self.leased[job_id]:
                return None
            self.used[job_id] += 1
            return job_id

    def release(self, token: str) -> None:
        self.used[token] -= 1
        if self.used[token] <= 0:
            del self.used[token]
        spare = self.leased[token] - self.used[token]
        if spare > headroom(self.limits.get(token, 1)) and token not in self._shrinks:
            loop = asyncio.get_running_loop()
            self._shrinks[token] = loop.call_later(SHRINK_AFTER, self._shrink_soon, token)

    def _shrink_soon(self, job_id: str) -> None:
        self._shrinks.pop(job_id, None)
        task = asyncio.get_running_loop().create_task(self._fit(job_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _fit(self, job_id: str) -> None:
        """Renew the job's lease at what is in use plus the headroom (0: give it back)."""
        async with self._locks.setdefault(job_id, asyncio.Lock()):
            used = self.used[job_id]
            limit = self.limits.get(job_id, used)
            want = min(limit, used + headroom(limit)) if used else 0
            with contextlib.suppress(Unreachable):
                await self._lease(job_id, used, want)

    async def _lease(self, job_id: str, need: int, want: int) -> None:
        try:
            async with asyncio.timeout(self.ttl / 3):
                granted = await self.catalog.lease_slots(job_id, self.me, need, want,
                                                         self.ttl)
        except self.errors as exc:
            log.warning("catalog: cannot lease slots of job %s: %s", job_id, one_line(exc))
            raise Unreachable from exc
        # A renewal may grant less than is in use only if the lease lapsed meanwhile (the
        # catalog was away longer than its ttl): what is in use stays in use.
        self.leased[job_id] = max(granted, self.used[job_id]) if granted else 0
        if not self.leased[job_id]:
            del self.leased[job_id]

    async def _renewing(self) -> None:
        while True:
            await asyncio.sleep(self.renew)
            for job_id in list(self.leased):
                await self._fit(job_id)
