"""A transaction-mode job's backend connections (in one router process): at most
``pool_size``, shared by all its clients, a backend lent for one transaction at a time.

A backend given back goes straight to the first client waiting for one of its key (no
task, no future: the hot path of a busy pool); wait timeouts, the waiting NOTICE and
idle expiry are one sweep every ``SWEEP`` seconds, not a timer per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import protocol as pg
from .cancel_map import BackendKey
from .pool import PoolKey

if TYPE_CHECKING:
    from .transaction import TxClient


class TxBackend(asyncio.Protocol):
    """A logged-in backend connection of a transaction pool."""

    def __init__(self, pool: JobPool, key: PoolKey, cancel: BackendKey,
                 status: list[bytes], max_prepared: int) -> None:
        self.pool = pool
        self.key = key
        self.cancel = cancel  # the backend's own pid and secret
        self.status = status  # its login's ParameterStatus messages
        self.max_prepared = max_prepared
        self.prepared: OrderedDict[bytes, None] = OrderedDict()
        self.transport: asyncio.Transport | None = None
        self.client: TxClient | None = None
        self.reusable = True
        self.closed = False
        self.counted = True  # holds one of its pool's slots (given up exactly once)
        self.since = 0.0

    def attach(self, transport: asyncio.Transport, leftover: bytes) -> None:
        self.transport = transport
        transport.set_protocol(self)
        if leftover:  # a backend says nothing after its login's ReadyForQuery
            self.reusable = False

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.from_backend(data)
        else:  # an idle backend that speaks (its termination's FATAL): never reused
            self.reusable = False
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        client, self.client = self.client, None
        if client is not None:
            client.backend_lost()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pg.terminate())
            self.transport.close()


class PoolTimeout(Exception):
    pass


Connect = Callable[[], Awaitable[TxBackend]]
# What a waiter is given: a backend of its key, or None (a slot is its own: it logs in), or
# PoolTimeout (it waited --query-wait-timeout).
Give = Callable[["TxBackend | PoolTimeout | None"], None]


class Waiter:
    """A client waiting for a backend of ``key`` (the pool's queue is first come first
    served); ``notify`` runs once it has waited ``notify_after`` seconds."""

    __slots__ = ("deadline", "give", "key", "notified", "notify", "notify_at", "pool")

    def __init__(self, pool: JobPool, key: PoolKey, give: Give, now: float, wait: float,
                 notify_after: float, notify: Callable[[], None]) -> None:
        self.pool, self.key, self.give, self.notify = pool, key, give, notify
        self.deadline = now + wait
        self.notify_at = now + notify_after
        self.notified = False


SWEEP = 0.5  # s between looks at the pool's waiters (timeouts, notices) and idle backends


class JobPool:
    """One job's backend connections in transaction mode (in one router process): at most
    ``size``, shared by every client of the job, idle ones kept ``idle_timeout`` seconds.

    ``count`` is the slots taken: backends idle, lent or logging in. A backend gives its
    slot up exactly once (``_uncount``), when it closes or hands the slot to a waiter. A
    backend given back goes straight to the first waiter of its key (no task, no future:
    the hot path of a busy pool); timeouts, notices and idle expiry are one sweep every
    ``SWEEP`` seconds, not a timer per transaction."""

    def __init__(self, job_id: str, size: int, idle_timeout: float) -> None:
        self.job_id = job_id
        self.size = size
        self.idle_timeout = idle_timeout
        self.count = 0
        self.idle: dict[PoolKey, list[TxBackend]] = {}
        self.waiters: deque[Waiter] = deque()
        self.statuses: dict[PoolKey, list[bytes]] = {}  # a login's ParameterStatus, per key
        self._sweeper: asyncio.TimerHandle | None = None

    def idle_count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    # --- taking ------------------------------------------------------------------------

    def take_now(self, key: PoolKey) -> TxBackend | None:
        """An idle backend of ``key``, if there is one (the fast path: no waiting)."""
        return self._take_idle(key)

    def must_wait(self) -> bool:
        """No idle backend of the caller's key, and no room for a new one."""
        return self.count >= self.size and not any(self.idle.values())

    def wait(self, key: PoolKey, give: Give, wait: float, notify_after: float,
             notify: Callable[[], None]) -> Waiter:
        now = asyncio.get_running_loop().time()
        waiter = Waiter(self, key, give, now, wait, notify_after, notify)
        self.waiters.append(waiter)
        self._sweep_soon()
        return waiter

    def forget(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    async def acquire(self, key: PoolKey, connect: Connect, wait: float,
                      notify_after: float, notify: Callable[[], None]) -> TxBackend:
        """A backend of ``key``: an idle one, a new one while the pool has room, else the
        next one a client gives back (PoolTimeout after ``wait`` seconds in all)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            backend = self._take_idle(key)
            if backend is not None:
                return backend
            if self.count < self.size:
                self.count += 1
            elif not self._close_other_idle():
                fut: asyncio.Future[TxBackend | PoolTimeout | None] = loop.create_future()

                def give(got: TxBackend | PoolTimeout | None,
                         fut: asyncio.Future[TxBackend | PoolTimeout | None] = fut) -> None:
                    if not fut.done():
                        fut.set_result(got)
                    elif isinstance(got, TxBackend):
                        self.release(got)  # (its waiter left meanwhile)
                    elif got is None:
                        self.give_up_slot()

                waiter = self.wait(key, give, deadline - loop.time(), notify_after, notify)
                try:
                    given = await fut
                except asyncio.CancelledError:
                    self.forget(waiter)
                    raise
                if isinstance(given, PoolTimeout):
                    raise given
                if given is not None:
                    if given.closed:
                        continue  # it died on its way here: try again
                    return given
            # One slot of this pool is ours: log in on it.
            return await self.connect_on_slot(connect)

    async def connect_on_slot(self, connect: Connect) -> TxBackend:
        """Log in on a slot already counted as the caller's (given back if it fails)."""
        try:
            return await connect()
        except BaseException:
            self.give_up_slot()
            raise

    def give_up_slot(self) -> None:
        self.count -= 1
        self._next_waiter_connects()

    def _take_idle(self, key: PoolKey) -> TxBackend | None:
        idle = self.idle.get(key)
        while idle:
            backend = idle.pop()
            if not idle:
                del self.idle[key]
            if not backend.closed:
                return backend
        return None

    def _unidle(self, backend: TxBackend) -> bool:
        idle = self.idle.get(backend.key)
        if not idle or backend not in idle:
            return False
        idle.remove(backend)
        if not idle:
            del self.idle[backend.key]
        return True

    def _close_other_idle(self) -> bool:
        """Close the oldest idle backend (of another key) and take its slot; False if none."""
        oldest: TxBackend | None = None
        for backends in self.idle.values():
            for b in backends:
                if oldest is None or b.since < oldest.since:
                    oldest = b
        if oldest is None:
            return False
        self._unidle(oldest)
        oldest.counted = False  # its slot is the caller's now
        oldest.close()
        return True

    def _uncount(self, backend: TxBackend) -> None:
        if backend.counted:
            backend.counted = False
            self.give_up_slot()

    # --- giving back -------------------------------------------------------------------

    def release(self, backend: TxBackend) -> None:
        """A client gives ``backend`` back, idle: to the first waiter, or kept."""
        backend.client = None
        if backend.closed or not backend.reusable:
            backend.close()
            self._uncount(backend)
            return
        if self.waiters:
            waiter = self.waiters.popleft()
            if waiter.key == backend.key:
                waiter.give(backend)
            else:
                backend.counted = False  # its slot goes to the waiter, which logs in anew
                backend.close()
                waiter.give(None)
            return
        backend.since = asyncio.get_running_loop().time()
        self.idle.setdefault(backend.key, []).append(backend)
        self._sweep_soon()

    def lost(self, backend: TxBackend) -> None:
        """A backend's connection closed (PostgreSQL stopped, or the router closed it)."""
        self._unidle(backend)
        self._uncount(backend)

    def _next_waiter_connects(self) -> None:
        """A slot came free: the first waiter logs in on it."""
        if self.waiters and self.count < self.size:
            self.count += 1
            self.waiters.popleft().give(None)

    # --- the sweep ---------------------------------------------------------------------

    def _sweep_soon(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for waiter in list(self.waiters):
            if now >= waiter.deadline:
                self.forget(waiter)
                waiter.give(PoolTimeout())
            elif not waiter.notified and now >= waiter.notify_at:
                waiter.notified = True
                waiter.notify()
        for backends in list(self.idle.values()):
            for b in list(backends):
                if now - b.since >= self.idle_timeout:
                    self._unidle(b)
                    b.close()
                    self._uncount(b)
        if self.waiters or any(self.idle.values()):
            self._sweep_soon()

    def close_idle(self) -> None:
        for backends in list(self.idle.values()):
            for b in list(backends):
                self._unidle(b)
                b.close()
                self._uncount(b)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for backends in list(self.idle.values()):
            for b in list(backends):
                b.close()
        self.idle.clear()
