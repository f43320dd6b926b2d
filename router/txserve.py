"""Transaction mode's side of the server: a client's login, and a backend per transaction.

A transaction-mode client is told what a login says (a backend's ParameterStatus: the
pool's last login of the same key, or a login now, which also wakes the job), a key of
the router's, and then served by a ``TxClient``, which asks for a backend at each
transaction: at once (``take_now``: an idle one, or a place in a full pool's queue) or,
when something must be awaited (a wake, a login, a job coming back), in a task
(``backend``). The pool and the client are ``txpool`` and ``transaction``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from jobmesh.controller.catalog.states import Access

from . import errors
from . import protocol as pg
from .cancel_map import BackendKey
from .errors import ClientError
from .hold import HOLD_RETRY, hold
from .inbox import Inbox
from .login import Refused, open_backend
from .pool import PoolKey, pool_key
from .routes import JobRoute
from .session import Session
from .startup import Startup
from .transaction import ClientFailed, TxClient
from .txpool import JobPool, PoolTimeout, TxBackend, Waiter

if TYPE_CHECKING:
    from .server import Router



class TransactionMode:
    def __init__(self, router: Router) -> None:
        self.r = router

    async def serve(self, inbox: Inbox, job_id: str, access: Access,
                                  route: JobRoute | None, request: Startup, pipelined: bytes,
                                  slot: object | None) -> bool:
        """A client of a transaction-mode job: told what a login says (a backend's
        ParameterStatus, from the pool's last login of the same key, or from a login now,
        which also wakes the job), a key of the router's, then served per transaction."""
        def notice(text: str) -> None:
            inbox.write(pg.notice_response(text))

        if route is None:
            route, more = await self.r._wait_for_wake(inbox, job_id, access)
            pipelined += more
        key = pool_key(route.host, route.port, route.user, route.database, request.forwarded)
        pool = self.pool(job_id, route)
        status = pool.statuses.get(key)
        if status is None:
            try:
                backend, more = await hold(inbox, self.backend(job_id, access, request,
                                                                   notice))
            except ClientFailed as exc:  # the backend refused the login: its own FATAL
                inbox.write(exc.error)
                inbox.close()
                return False
            pipelined += more
            status = backend.status
            pool.release(backend)
        if inbox.closed or self.r._stopping:
            inbox.close()
            return False
        assert inbox.transport is not None
        pid = secrets.randbits(31) | 1  # a client holds no backend of its own: no real pid

        params = tuple(sorted(request.forwarded.items()))  # (sorted once, not per transaction)

        def take_now(client: TxClient) -> TxBackend | Waiter | None:
            return self.take_now(client, job_id, access, params)

        async def take(client: TxClient, slot: bool) -> TxBackend:
            try:
                if slot:
                    got = await self.on_slot(job_id, access, request)
                    if got is not None:
                        return got
                return await self.backend(job_id, access, request, client.notice)
            except ClientError as exc:
                self.r.metrics.errors.labels(exc.sqlstate).inc()
                raise ClientFailed(exc.to_bytes()) from exc

        def timeout_error() -> bytes:
            return self.timeout(job_id, pool).to_bytes()

        def ended(c: TxClient) -> None:
            self.r.tx_transactions[job_id] += c.transactions
            self.r._forget(session)

        client = TxClient(job_id, inbox.transport, take_now, take, ended, timeout_error)
        secret = self.r.cancel_map.issue_for(pid, client.current_cancel, request.key_length)
        session = Session(route, request.user, secret, pid, slot)
        session.tx = client
        self.r.assignments[job_id] += 1
        self.r.sessions.add(session)
        self.r._job_sessions[job_id] += 1
        self.r._drained.clear()
        inbox.write(b"".join(status) + pg.backend_key_data(pid, secret) + pg.ready_for_query())
        inbox.transport.set_protocol(client)
        client.start(pipelined + inbox.take_buffered())
        return True

    def take_now(self, client: TxClient, job_id: str, access: Access,
                     params: tuple[tuple[str, str], ...]) -> TxBackend | Waiter | None:
        """The hot path: an idle backend at once, or the client queued on a full pool;
        None when something must be awaited (a wake, a login)."""
        if self.r.pauses.hold_for(job_id) is not None:
            return None  # (the slow path waits for RESUME)
        try:
            route = self.r.routes.route(job_id, access)
        except ClientError:
            return None
        pool = self.r.tx_pools.get(job_id)
        if route is None or pool is None:
            return None
        key = (route.host, route.port, route.user, route.database, params)
        backend = pool.take_now(key)
        if backend is not None or not pool.must_wait():
            return backend
        return pool.wait(key, client.given, self.r.config.query_wait_timeout,
                         self.r.config.query_wait_notify,
                         lambda: client.notice(self.waiting(job_id, pool)))

    async def on_slot(self, job_id: str, access: Access,
                          request: Startup) -> TxBackend | None:
        """A queued client was given a slot of its pool: log in on it (None: the job is
        not running any more; the slot is given back and the caller wakes it)."""
        pool = self.r.tx_pools[job_id]
        try:
            route = self.r.routes.route(job_id, access)
        except ClientError:  # (ended, or the catalog unreachable): the slot is not kept
            pool.give_up_slot()
            raise
        if route is None:
            pool.give_up_slot()
            return None
        key = pool_key(route.host, route.port, route.user, route.database, request.forwarded)
        return await pool.connect_on_slot(
            lambda: self.connect(pool, key, route, request.forwarded))

    def waiting(self, job_id: str, pool: JobPool) -> str:
        return (f"waiting for a server connection: job_{job_id}'s {pool.size} are all in "
                "transactions")

    def timeout(self, job_id: str, pool: JobPool) -> ClientError:
        self.r.metrics.errors.labels("53300").inc()
        return errors.too_many(
            f"job_{job_id}'s {pool.size} server connections stayed busy for "
            f"{self.r.config.query_wait_timeout:g} s",
            "Raise the job's pool_size, or keep transactions short.")

    def pool(self, job_id: str, route: JobRoute) -> JobPool:
        size = route.pool_size or self.r.config.pool_size or 1
        pool = self.r.tx_pools.get(job_id)
        if pool is None:
            pool = JobPool(job_id, size, self.r.config.server_idle_timeout)
            self.r.tx_pools[job_id] = pool
        pool.size = size  # (a RELOAD or job update may have changed it)
        return pool

    async def backend(self, job_id: str, access: Access, request: Startup,
                          notice: Callable[[str], None]) -> TxBackend:
        """A backend for one transaction: woken, held while its job comes back (as
        ``_reach``), waited for while the pool is busy (53300 after --query-wait-timeout)."""
        held_until: float | None = None
        delay = HOLD_RETRY[0]
        while True:
            held = self.r.pauses.hold_for(job_id)
            if held is not None:
                notice(f"job_{job_id} is paused (PAUSE): waiting for RESUME")
                await held.wait()
                continue
            route = self.r.routes.route(job_id, access)
            if route is None:
                route = await self.r.routes.wake(job_id, access, notice)
            try:
                return await self.acquire(job_id, route, request, notice)
            except errors.NotAnswering as exc:
                held_until = self.r._hold_until(job_id, exc, held_until, notice)
            await asyncio.sleep(delay)
            delay = min(delay * 2, HOLD_RETRY[1])

    async def acquire(self, job_id: str, route: JobRoute, request: Startup,
                          notice: Callable[[str], None]) -> TxBackend:
        pool = self.pool(job_id, route)
        key = pool_key(route.host, route.port, route.user, route.database, request.forwarded)
        try:
            return await pool.acquire(
                key, lambda: self.connect(pool, key, route, request.forwarded),
                self.r.config.query_wait_timeout, self.r.config.query_wait_notify,
                lambda: notice(self.waiting(job_id, pool)))
        except PoolTimeout:
            raise self.timeout(job_id, pool) from None

    async def connect(self, pool: JobPool, key: PoolKey, route: JobRoute,
                          forwarded: dict[str, str]) -> TxBackend:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            inbox, ready, kd, status = await open_backend(
                route, forwarded, _ignore, self.r.config.connect_timeout)
        except Refused as exc:
            self.r.metrics.errors.labels(exc.code).inc()
            raise ClientFailed(exc.raw) from None
        self.r.metrics.backend_connect.observe(loop.time() - started)
        status = pool.statuses[key] = self.r._shared(status)
        backend = TxBackend(pool, key, BackendKey(route.host, route.port, kd.pid, kd.secret),
                            status, self.r.config.max_prepared_statements)
        assert inbox.transport is not None
        backend.attach(inbox.transport, ready.leftover + inbox.take_buffered())
        return backend


def _ignore(data: bytes) -> None:
    pass  # a pooled login's notices: nobody's to hear
