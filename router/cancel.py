"""Forwarding a client's CancelRequest to the backend that runs its query.

A key names no worker or router (``cancel_map.py``), so one this worker did
not issue is asked of every sibling worker, then of every peer router
(``fleet.py``); whoever issued it forwards it.
A cancel nobody knows is a miss: each source address may miss a few times
in a burst and then about twice a second (``MissBudget``); past that, its
cancels are dropped unread until its budget refills. That is what makes a
32-bit secret hard to guess: a spray of wrong keys at a known pid gets about
two tries a second per worker, and no try while throttled. A client behind
the same address as a sprayer is throttled with it (its cancels are dropped
until the budget refills); that trade is documented in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from . import peers
from . import protocol as pg
from .cancel_map import CancelMap
from .config import RouterConfig
from .fleet import Peers
from .inbox import ConnectionClosed, Inbox
from .metrics import RouterMetrics

log = logging.getLogger(__name__)

MISS_BURST = 20  # misses a source address may have at once...
MISS_RATE = 2.0  # ...then this many a second
MISS_ADDRESSES = 4096  # addresses remembered at most (the least recent are forgotten)


class MissBudget:
    """A token bucket per source address, spent by cancels that matched no key."""

    def __init__(self, burst: float = MISS_BURST, rate: float = MISS_RATE,
                 most: int = MISS_ADDRESSES) -> None:
        self.burst, self.rate, self.most = burst, rate, most
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def _tokens(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def allows(self, source: str, now: float) -> bool:
        return self._tokens(source, now) >= 1

    def missed(self, source: str, now: float) -> None:
        self._buckets[source] = (self._tokens(source, now) - 1, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self.most:
            self._buckets.popitem(last=False)


class Canceller:
    def __init__(self, cancel_map: CancelMap, config: RouterConfig, metrics: RouterMetrics,
                 misses: MissBudget | None = None, peers: Peers | None = None) -> None:
        self.cancel_map = cancel_map
        self.config = config
        self.metrics = metrics
        self.misses = misses or MissBudget()
        self.peers = peers

    async def handle(self, pid: int, secret: bytes, source: str) -> None:
        """A CancelRequest from a client at ``source`` (its address)."""
        now = time.monotonic()
        if not self.misses.allows(source, now):
            self.metrics.cancels.labels("rate_limited").inc()
            return
        if await self.in_this_router(pid, secret):
            return
        if self.peers is not None and await self.peers.ask(pid, secret):
            self.metrics.cancels.labels("to_peer").inc()
            return
        self.misses.missed(source, now)
        self.metrics.cancels.labels("unknown_key").inc()

    async def in_this_router(self, pid: int, secret: bytes) -> bool:
        """Forward the cancel if this worker or a sibling issued the key (what a peer
        router's forwarded cancel gets: never passed on again)."""
        return await self.cancel_here(pid, secret) or await self._ask_siblings(pid, secret)

    async def _ask_siblings(self, pid: int, secret: bytes) -> bool:
        directory = self.config.control_dir
        others = [w for w in range(self.config.workers) if w != self.config.worker_index]
        if directory is None or not others:
            return False

        async def ask(worker: int) -> bool:
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    return await peers.forward_cancel(directory, worker, pid, secret)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("cancel could not reach router worker %d: %s", worker, exc)
                return False

        return any(await asyncio.gather(*(ask(w) for w in others)))

    async def cancel_here(self, pid: int, secret: bytes) -> bool:
        """Forward the cancel if this worker issued the key; False when it did not."""
        found = self.cancel_map.lookup(pid, secret)
        if found is None:
            return False
        target = found() if callable(found) else found
        if target is None:  # a transaction-mode client between transactions
            self.metrics.cancels.labels("nothing_running").inc()
            return True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, backend = await loop.create_connection(Inbox, target.host, target.port)
                backend.write(pg.cancel_request(target.pid, target.secret))
                # Postgres closes the connection once it has read the request.
                with contextlib.suppress(ConnectionClosed):
                    await backend.read()
                backend.close()
        except (OSError, TimeoutError) as exc:
            self.metrics.cancels.labels("failed").inc()
            log.warning("cancel to %s:%s failed: %s", target.host, target.port, exc)
            return True
        self.metrics.cancels.labels("forwarded").inc()
        return True
