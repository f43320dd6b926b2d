"""Server connections kept for the next client (session mode), as PgBouncer's pools.

When a client leaves, its backend connection is not closed: the router sends
``DISCARD ALL`` (PgBouncer's ``server_reset_query``: it closes cursors,
resets every setting to the session's startup values, deallocates prepared
statements, unlistens, releases advisory locks and drops temporary tables)
and keeps the connection if, and only if, the backend answers exactly
``CommandComplete`` then ``ReadyForQuery`` idle. Anything else (the client
left inside a transaction, in COPY, mid-query or mid-pipeline: its pending
output comes first, or the reset fails) closes the connection, never reuses
it.

Connections are pooled by everything that makes a session what it is at
startup: the job's backend address, database and role, and the client's
startup parameters (``options=-c search_path=...``, ``application_name``...),
since ``RESET ALL`` returns to those and one client's must never survive into
another's session. A job keeps at most ``size`` idle connections (the oldest
goes first), each at most ``idle_timeout`` seconds. A pooled connection is no
session: it does not keep its job awake, and a pause (which stops Postgres)
ends it. The next client of the same key is told the login's
ParameterStatus messages, its real backend pid and a fresh cancel secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from . import protocol as pg
from .backend_handshake import KeyData
from .inbox import ConnectionClosed, Inbox
from .metrics import RouterMetrics

log = logging.getLogger(__name__)

RESET_QUERY = "DISCARD ALL"
RESET_TIMEOUT = 5.0  # s for the reset's answer; a backend slower than that is closed

CROWDED_RETRIES = 3  # kept connections closed at most, one by one, for a client PostgreSQL
# refused as too many (53300) while connections of other startup parameters sat kept

PoolKey = tuple[str, int, str, str, tuple[tuple[str, str], ...]]


class Crowded(Exception):
    """PostgreSQL said "too many clients" while the job has connections kept idle."""


def pool_key(host: str, port: int, user: str, database: str,
             params: dict[str, str]) -> PoolKey:
    return host, port, user, database, tuple(sorted(params.items()))


@dataclass(eq=False)
class Pooled:
    """An idle, reset backend connection and what its next client is told."""

    inbox: Inbox
    key: KeyData  # the backend's own pid and secret
    status: list[bytes]  # the ParameterStatus messages of its login, as the backend sent them
    since: float = 0.0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def usable(self) -> bool:
        """Still open, and silent since it was reset (a backend that says anything while
        idle, such as its termination's FATAL, is not reused)."""
        return not self.inbox.closed and not self.inbox.take_buffered() and \
            self.inbox.transport is not None and not self.inbox.transport.is_closing()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.inbox.write(pg.terminate())
        self.inbox.close()


class ServerPool:
    def __init__(self, size: int, idle_timeout: float,
                 metrics: RouterMetrics | None = None) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self.metrics = metrics or RouterMetrics()
        self._idle: dict[str, OrderedDict[Pooled, PoolKey]] = {}  # job -> its idle, oldest first

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def idle_count(self, job_id: str | None = None) -> int:
        if job_id is not None:
            return len(self._idle.get(job_id, ()))
        return sum(len(d) for d in self._idle.values())

    def idle_by_user(self) -> dict[tuple[str, str], int]:
        """(job, backend role) -> idle connections kept (the admin console's pools)."""
        counts: dict[tuple[str, str], int] = {}
        for job_id, idle in self._idle.items():
            for key in idle.values():
                counts[(job_id, key[2])] = counts.get((job_id, key[2]), 0) + 1
        return counts

    def all_idle(self) -> list[tuple[str, str, Pooled]]:
        return [(job_id, key[2], pooled) for job_id, idle in self._idle.items()
                for pooled, key in idle.items()]

    def take(self, job_id: str, key: PoolKey) -> Pooled | None:
        """The most recently kept idle connection of ``key``, or None."""
        idle = self._idle.get(job_id)
        if not idle:
            return None
        for pooled in reversed([p for p, k in idle.items() if k == key]):
            del idle[pooled]
            if pooled.timer is not None:
                pooled.timer.cancel()
            if pooled.usable():
                self.metrics.server_reused.inc()
                self._count(job_id)
                return pooled
            pooled.close()
        self._count(job_id)
        return None

    async def evict_oldest(self, job_id: str, timeout: float = 5.0) -> bool:
        """Close the job's oldest kept connection and wait until PostgreSQL has closed it
        (its slot is free by then); False when the job keeps none."""
        idle = self._idle.get(job_id)
        if not idle:
            return False
        oldest, _ = idle.popitem(last=False)
        self._count(job_id)
        if oldest.timer is not None:
            oldest.timer.cancel()
        oldest.inbox.write(pg.terminate())
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(timeout):
                while True:  # until the backend has exited and closed its end
                    await oldest.inbox.read()
        oldest.inbox.close()
        return True

    def _count(self, job_id: str) -> None:
        idle = self._idle.get(job_id)
        if idle:
            self.metrics.server_idle.labels(job_id).set(len(idle))
        else:
            self._idle.pop(job_id, None)
            with contextlib.suppress(KeyError):
                self.metrics.server_idle.remove(job_id)

    def put(self, job_id: str, key: PoolKey, pooled: Pooled) -> None:
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(job_id, OrderedDict())
        while len(idle) >= self.size:
            oldest, _ = idle.popitem(last=False)
            oldest.close()
        pooled.since = loop.time()
        pooled.timer = loop.call_later(self.idle_timeout, self._expire, job_id, pooled)
        idle[pooled] = key
        self._count(job_id)

    def _expire(self, job_id: str, pooled: Pooled) -> None:
        idle = self._idle.get(job_id)
        if idle is not None and idle.pop(pooled, None) is not None:
            pooled.timer = None
            pooled.close()
            self._count(job_id)

    def close_job(self, job_id: str | None) -> None:
        """Close the idle connections kept for ``job_id`` (None: every job's)."""
        for j, idle in list(self._idle.items()):
            if job_id is None or j == job_id:
                for pooled in idle:
                    pooled.close()
                idle.clear()
                self._count(j)

    def close(self) -> None:
        for job_id, idle in list(self._idle.items()):
            for pooled in idle:
                pooled.close()
            idle.clear()
            self._count(job_id)

    @staticmethod
    def hold(backend: asyncio.Transport) -> Inbox:
        """Take a backend its client left from the splice: what it says from now on is
        kept (for ``reset`` to see), never written to the gone client."""
        inbox = Inbox()
        inbox.transport = backend
        backend.set_protocol(inbox)
        backend.resume_reading()  # (a paused client may have paused it)
        return inbox

    async def reset(self, inbox: Inbox, key: KeyData,
                    status: list[bytes]) -> Pooled | None:
        """``DISCARD ALL`` on a backend its client left (``hold``); the connection, idle and
        reset, or None (then it is closed) when the backend answers anything but exactly
        that (anything it said since its client left included)."""
        inbox.write(pg.query(RESET_QUERY))
        frames = pg.FrameBuffer()
        status = list(status)
        done = False
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                while True:
                    msg = frames.next_message(pg.MAX_BACKEND_STARTUP_MESSAGE)
                    if msg is None:
                        frames.feed(await inbox.read())
                        continue
                    if msg.type == b"S":
                        name, _ = pg.decode_parameter_status(msg.body)
                        status = [s for s in status if _status_name(s) != name]
                        status.append(pg.message(b"S", msg.body))
                    elif msg.type == b"N":
                        continue
                    elif msg.type == b"C" and msg.body == b"DISCARD ALL\0" and not done:
                        done = True
                    elif msg.type == b"Z" and done and msg.body == b"I" and not len(frames):
                        return Pooled(inbox, key, status)
                    else:
                        break
        except (ConnectionClosed, TimeoutError, pg.ProtocolViolation):
            pass
        self.metrics.server_not_kept.inc()
        with contextlib.suppress(Exception):
            inbox.close()
        return None


def _status_name(message: bytes) -> str:
    return pg.decode_parameter_status(message[5:])[0]
