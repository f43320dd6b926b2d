"""The router's asyncio server: accept, run the handshake, log in to the backend, splice.

The protocol rules live in the sans-IO modules (``handshake``,
``client_auth``, ``backend_handshake``); who may connect and where jobs run
is the route source's business (``route_source``); holding a client while
its job wakes is ``hold``'s. This module only moves bytes between them and
sockets and keeps the books (sessions, limits, cancel keys, activity).

At ~650 lines it is over the usual ~400 on purpose: it is one connection's
path from accept to splice and back to the pool (holding the client while its
job wakes or comes back from a crash included), read top to bottom; the parts
that are ideas of their own already live in their own modules (handshakes,
backend login, splice, slots and leases, cancel, peers and registry, pool,
transaction mode (``txserve``, ``transaction``, ``txpool``, ``txsql``), admin
console, pauses, hold, shutdown). The next split is the stop (``shutdown``,
``_terminable``) into ``shutdown.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from prometheus_client import generate_latest

from jobmesh.controller.catalog.states import Access

from . import errors, peers
from . import protocol as pg
from .activity import ActivityReporter
from .admin import Console
from .backend_handshake import KeyData, Ready
from .cancel import Canceller
from .cancel_map import BackendKey, CancelMap
from .client_auth import CleartextExchange, Exchange, ScramExchange
from .config import RouterConfig
from .credentials import MockVerifiers
from .errors import ClientError
from .fleet import PeerAuth, Peers, serve_peers
from .handshake import AuthResponse, ClientHandshake, Terminated
from .hold import HOLD_RETRY, hold
from .inbox import ConnectionClosed, Inbox
from .leases import Leased, Leases, Unreachable, router_id
from .login import Refused, open_backend
from .metrics import RouterMetrics
from .pauses import ALL, Pauses
from .pool import CROWDED_RETRIES, RESET_TIMEOUT, Crowded, PoolKey, ServerPool, pool_key
from .registry import Registry, RegistryCatalog
from .route_source import RouteSource
from .routes import JobRoute, Principal
from .session import Session
from .shutdown import Terminable, terminate_backends
from .slots import LocalSlots, SharedSlots, Slots
from .splice import ClientFeed, Pipe, splice
from .startup import Startup, read_startup
from .txpool import JobPool
from .txserve import TransactionMode

log = logging.getLogger(__name__)



class Router:
    def __init__(self, config: RouterConfig, routes: RouteSource, *,
                 metrics: RouterMetrics | None = None,
                 activity: ActivityReporter | None = None,
                 leases: Leases | None = None,
                 registry_catalog: RegistryCatalog | None = None,
                 catalog_errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
        self.config = config
        self.routes = routes
        self.activity = activity
        self.cancel_map = CancelMap()
        self.sessions: set[Session] = set()
        self._job_sessions: Counter[str] = Counter()
        self.metrics = metrics or RouterMetrics()
        self.metrics.track_sessions(lambda: self.sessions)
        self.pool = ServerPool(config.pool_size, config.server_idle_timeout, self.metrics)
        self.tx_pools: dict[str, JobPool] = {}  # transaction mode: per job
        self.pauses = Pauses()  # the admin console's PAUSE
        self.tx_transactions: Counter[str] = Counter()  # of transaction-mode clients gone
        self.transactions = TransactionMode(self)
        self.assignments: Counter[str] = Counter()  # sessions given a backend, per job
        self._statuses: dict[tuple[bytes, ...], list[bytes]] = {}
        self.on_reload: Callable[[], None] | None = None  # what RELOAD does (main.py sets it)
        self._resets: set[asyncio.Task[None]] = set()
        peer_auth = PeerAuth(config.peer_secret) if config.peer_secret is not None else None
        self._peer_auth = peer_auth
        registering = registry_catalog is not None and config.peer_listen is not None
        fleet = (Peers(config.peers, peer_auth, config.peer_listen, config.connect_timeout)
                 if peer_auth is not None and (config.peers or registering) else None)
        self.registry: Registry | None = None
        if registering and fleet is not None and registry_catalog is not None:
            advertised = config.peer_advertise or config.peer_listen
            assert advertised is not None
            me = leases.me if leases is not None else router_id()
            self.registry = Registry(registry_catalog, me, advertised, fleet,
                                     config.lease_ttl, catalog_errors)
        self.canceller = Canceller(self.cancel_map, config, self.metrics, peers=fleet)
        self._peer_server: asyncio.Server | None = None
        self.slots: Slots = (
            SharedSlots(Path(config.control_dir) / "slots") if config.control_dir else LocalSlots()
        )
        self.leases = leases  # catalog jobs' limits, across routers (the route file's: slots)
        # Each worker takes its share of the global client limit.
        self._max_clients = -(-config.max_client_conn // config.workers)
        self._control: asyncio.Server | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._mock = MockVerifiers()
        self._server: asyncio.Server | None = None
        self._stopping = False
        self._drained = asyncio.Event()
        self._drained.set()

    # --- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.metrics.bind_loop(loop)
        if self.config.listen_fd is not None:
            sock = socket.socket(fileno=self.config.listen_fd)
            self._server = await loop.create_server(self._new_inbox, sock=sock, backlog=4096)
        else:
            self._server = await loop.create_server(
                self._new_inbox, self.config.host, self.config.port, backlog=4096
            )
        if self.config.control_dir is not None:
            self._control = await peers.serve_control(
                self.config.control_dir,
                self.config.worker_index,
                self.canceller.cancel_here,
                lambda: generate_latest(self.metrics.registry),
            )
        if self.config.peer_listen is not None:
            assert self._peer_auth is not None, "a peer port needs the peer secret"
            host, port = self.config.peer_listen
            self._peer_server = await serve_peers(host, port, self._peer_auth,
                                                  self.canceller.in_this_router, self.metrics,
                                                  self.config.connect_timeout)
        if self.activity is not None:
            self.activity.start(lambda: self._job_sessions, f"{self.config.host}:{self.port}")
        if self.leases is not None:
            self.leases.start()
        if self.registry is not None:
            self.registry.start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def reload(self, routes: RouteSource) -> None:
        """New connections use the new routes; live sessions are untouched."""
        self.routes = routes

    async def shutdown(self) -> None:
        """Stop accepting, let sessions finish, then end the rest with 57P01."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        try:
            await asyncio.wait_for(self._drained.wait(), self.config.shutdown_timeout)
        except TimeoutError:
            log.info("shutdown timeout: terminating %d sessions", len(self.sessions))
            await terminate_backends(self._terminable())
            try:
                await asyncio.wait_for(self._drained.wait(), 5)
            except TimeoutError:
                for s in list(self.sessions):
                    s.close()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.wait(self._handshakes, timeout=5)
        if self._control is not None:
            self._control.close()
        if self._peer_server is not None:
            self._peer_server.close()
        if self._resets:
            await asyncio.wait(self._resets, timeout=RESET_TIMEOUT + 1)
        self.pool.close()
        for tx_pool in self.tx_pools.values():
            tx_pool.close()
        if self.activity is not None:
            await self.activity.close()
        if self.leases is not None:
            await self.leases.close()
        if self.registry is not None:
            await self.registry.close()

    def _terminable(self) -> list[Terminable | Session]:
        """What the stop asks PostgreSQL to end: every spliced session's backend, and the
        backend of every transaction-mode client inside a transaction. A transaction-mode
        client between transactions is at a message boundary the router knows: it is told
        57P01 here and closed."""
        targets: list[Terminable | Session] = []
        for s in list(self.sessions):
            if s.tx is None:
                targets.append(s)
            elif s.tx.backend is not None:
                targets.append(Terminable(s.job, s.tx.backend.cancel.pid))
            elif not s.tx.busy:
                s.tx.fail(errors.shutting_down().to_bytes())
        return targets

    def _shared(self, status: list[bytes]) -> list[bytes]:
        """One list for every session whose login said the same (it is kept per session
        for pooling: about 1 KB each otherwise); never mutated (pool.reset copies it)."""
        key = tuple(status)
        found = self._statuses.get(key)
        if found is None:
            if len(self._statuses) >= 4096:
                self._statuses.clear()
            found = self._statuses[key] = status
        return found

    def request_reload(self) -> None:
        """The admin console's RELOAD: what SIGHUP does."""
        if self.on_reload is not None:
            self.on_reload()

    def _new_inbox(self) -> Inbox:
        inbox = Inbox()
        inbox.on_made = self._spawn_handshake
        return inbox

    def _spawn_handshake(self, inbox: Inbox) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(inbox))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    # --- one client --------------------------------------------------------

    async def _serve(self, inbox: Inbox) -> None:
        try:
            await self._handshake(inbox)
        except ClientError as exc:
            self._reject(inbox, exc)
        except pg.ProtocolViolation as exc:
            self._reject(inbox, errors.protocol_violation(str(exc)))
        except (ConnectionClosed, TimeoutError, ssl.SSLError, OSError):
            inbox.close()
        except asyncio.CancelledError:
            if inbox.no_reply:
                inbox.close()
            else:
                self._reject(inbox, errors.shutting_down())
        except Exception:  # a bug: the client still gets a proper error
            log.exception("internal error while serving a client")
            self._reject(inbox, ClientError("XX000", "internal error in the router",
                                            "This is a jobmesh bug; the router log has details."))

    def _reject(self, inbox: Inbox, exc: ClientError) -> None:
        self.metrics.errors.labels(exc.sqlstate).inc()
        log.info("rejected client: %s %s", exc.sqlstate, exc.message)
        if not inbox.no_reply:
            inbox.write(exc.to_bytes())
        inbox.close()

    async def _handshake(self, inbox: Inbox) -> None:
        hs = ClientHandshake()
        async with asyncio.timeout(self.config.startup_timeout):
            startup, tls = await self._negotiate(inbox, hs)
            if startup is None:
                return
            request = self._check_startup(inbox, startup, tls)
            user, job_id = request.user, request.job_id
            principal = await self._authenticate(inbox, hs, user, tls)
        if request.console:
            if not (principal.admin or principal.stats):
                raise errors.not_console_user(user)
            inbox.write(pg.auth_ok())
            console = Console(self, inbox, user, admin=principal.admin)
            await console.serve(hs.authenticated())
            return
        # Only now, with the client known, may a lookup reveal or wake anything.
        job = self.routes.job(job_id) or await self.routes.look_again(job_id)
        if job is None:
            raise errors.unknown_job(job_id)
        access = principal.access(job_id)
        if access is None:
            raise errors.not_granted(user, job_id)
        if self._stopping:
            raise errors.shutting_down()
        route = self.routes.route(job_id, access)
        slot = None
        if job.max_connections is not None:
            slot = await self._take_slot(job_id, job.max_connections)
        pipelined = hs.authenticated()
        inbox.write(pg.auth_ok())
        spliced = False
        try:
            pipelined += await self._while_paused(inbox, job_id)
            if job.pool_mode == "transaction":
                spliced = await self.transactions.serve(inbox, job_id, access, route,
                                                        request, pipelined, slot)
            else:
                spliced = await self._reach(inbox, job_id, access, route, request,
                                            pipelined, slot)
        finally:
            if not spliced and slot is not None:
                self._release_slot(slot)

    async def _take_slot(self, job_id: str, limit: int) -> object:
        """One of the job's max_connections: leased across routers (catalog jobs), or
        shared by this router's workers (the route file's)."""
        if self.leases is not None:
            try:
                token = await self.leases.acquire(job_id, limit)
            except Unreachable:
                raise errors.too_many(
                    f"job {job_id} allows {limit} across the routers, and the catalog that "
                    "counts them cannot be reached", "Try again in a moment.") from None
            slot: object | None = None if token is None else Leased(token)
        else:
            slot = self.slots.acquire(job_id, limit)
        if slot is None:
            raise errors.too_many(f"job {job_id} allows {limit}",
                                  "Close idle connections to this job or raise its "
                                  "max_connections.")
        return slot

    def _release_slot(self, slot: object) -> None:
        if isinstance(slot, Leased):
            assert self.leases is not None
            self.leases.release(slot.job_id)
        else:
            self.slots.release(slot)

    async def _reach(
        self,
        inbox: Inbox,
        job_id: str,
        access: Access,
        route: JobRoute | None,
        request: Startup,
        pipelined: bytes,
        slot: object | None,
    ) -> bool:
        """Log in to the job's backend, waking the job first if it is not running.

        A backend that is not there (its PostgreSQL died, or is in crash recovery)
        holds the client as a wake does, when the route source has someone to bring
        it back (the catalog's controller, told at once): until it answers, its row
        says it is recovering (then this is a wake), or --wake-timeout passes.
        """
        held_until: float | None = None
        delay = HOLD_RETRY[0]
        while True:
            if route is None:
                route, more = await self._wait_for_wake(inbox, job_id, access)
                pipelined += more
            assert inbox.transport is not None
            inbox.transport.pause_reading()  # hold pipelined queries in the kernel until spliced
            try:
                return await self._connect_backend(inbox, route, request, pipelined, slot)
            except errors.NotAnswering as exc:
                held_until = self._hold_until(job_id, exc, held_until, lambda text: inbox.write(
                    pg.notice_response(text)))
            inbox.transport.resume_reading()
            _, more = await hold(inbox, asyncio.sleep(delay))
            pipelined += more
            delay = min(delay * 2, HOLD_RETRY[1])
            route = self.routes.route(job_id, access)  # moved, or no longer running: a wake

    # --- PAUSE and RESUME (pauses.py) ---------------------------------------------------

    async def _while_paused(self, inbox: Inbox, job_id: str) -> bytes:
        """Hold a new client of a job the console paused until RESUME; what it sent."""
        held = self.pauses.hold_for(job_id)
        if held is None:
            return b""
        inbox.write(pg.notice_response(f"job_{job_id} is paused (PAUSE): waiting for RESUME"))
        _, more = await hold(inbox, held.wait())
        return more

    async def pause(self, job_id: str) -> None:
        """PAUSE: hold the job's traffic (pauses.ALL: every job's) until it uses no server."""
        def mine(other: str) -> bool:
            return job_id in (ALL, other)

        def busy() -> int:
            spliced = sum(1 for s in self.sessions if s.tx is None and mine(s.job_id))
            lent = sum(p.count - p.idle_count() for j, p in self.tx_pools.items() if mine(j))
            return spliced + lent

        def close_idle() -> None:
            for j in list(self.tx_pools):
                if mine(j):
                    self.tx_pools[j].close_idle()
            self.pool.close_job(None if job_id == ALL else job_id)

        await self.pauses.pause(job_id, busy, close_idle)

    def _hold_until(self, job_id: str, exc: errors.NotAnswering, held_until: float | None,
                    notice: Callable[[str], None]) -> float:
        """A backend did not answer: until when its client is held (told so once), as long
        as the route source will bring it back; else the client's error is raised."""
        now = asyncio.get_running_loop().time()
        if held_until is None:
            if not self.routes.unreachable(job_id):
                raise exc.error from exc
            self.metrics.clients_held.inc()
            log.info("job %s is not answering (%s): holding a client until it is back",
                     job_id, exc.detail)
            notice(f"job_{job_id} is not answering ({exc.detail}): waiting for it to come back")
            return now + self.config.wake_timeout
        if now >= held_until:
            raise errors.not_back(job_id, self.config.wake_timeout, exc.detail) from exc
        return held_until

    async def _wait_for_wake(
        self, inbox: Inbox, job_id: str, access: Access
    ) -> tuple[JobRoute, bytes]:
        """Outside the startup timeout: a wake has its own (--wake-timeout)."""
        def notice(text: str) -> None:
            inbox.write(pg.notice_response(text))

        route, more = await hold(inbox, self.routes.wake(job_id, access, notice))
        if self._stopping:
            raise errors.shutting_down()
        return route, more

    async def _next(self, inbox: Inbox, hs: ClientHandshake) -> object:
        while (event := hs.next_event()) is None:
            hs.receive_data(await inbox.read())
        return event

    async def _negotiate(
        self, inbox: Inbox, hs: ClientHandshake
    ) -> tuple[pg.StartupMessage | None, bool]:
        tls = False
        while True:
            event = await self._next(inbox, hs)
            if isinstance(event, pg.SSLRequest):
                if self.config.tls is None:
                    inbox.write(b"N")
                    continue
                if hs.has_buffered_data():
                    raise pg.ProtocolViolation("received unencrypted data after SSL request")
                inbox.write(b"S")
                loop = asyncio.get_running_loop()
                assert inbox.transport is not None
                inbox.transport = await loop.start_tls(
                    inbox.transport, inbox, self.config.tls, server_side=True
                )
                tls = True
            elif isinstance(event, pg.GSSENCRequest):
                inbox.write(b"N")
            elif isinstance(event, pg.CancelRequest):
                inbox.no_reply = True
                try:
                    await self.canceller.handle(event.pid, event.secret, _source(inbox))
                finally:
                    inbox.close()  # EOF is the only answer, as PostgreSQL gives
                return None, tls
            else:
                assert isinstance(event, pg.StartupMessage)
                return event, tls

    def _check_startup(self, inbox: Inbox, startup: pg.StartupMessage, tls: bool) -> Startup:
        if self.config.require_tls and not tls:
            raise errors.tls_required()
        if len(self._handshakes) + len(self.sessions) > self._max_clients:
            raise errors.too_many(
                f"max_client_conn={self.config.max_client_conn}",
                "Close idle connections or raise --max-client-conn.",
            )
        request = read_startup(startup)
        if request.negotiate is not None:
            inbox.write(request.negotiate)
        return request

    async def _authenticate(
        self, inbox: Inbox, hs: ClientHandshake, user: str, tls: bool
    ) -> Principal:
        principal = self.routes.user(user)
        verifier = principal.verifier if principal else self._mock.for_user(user)
        exchange: Exchange
        if tls and self.config.cleartext_over_tls:
            exchange = CleartextExchange(verifier, exists=principal is not None)
        else:
            cert = self.config.cert_pem if tls else None
            exchange = ScramExchange(verifier, exists=principal is not None, cert_pem=cert)
        inbox.write(exchange.start())
        while True:
            event = await self._next(inbox, hs)
            if isinstance(event, Terminated):
                raise ConnectionClosed
            assert isinstance(event, AuthResponse)
            step = exchange.step(event.body)
            if step.reply:
                inbox.write(step.reply)
            if step.done:
                break
        if not step.ok or principal is None:
            self.metrics.auth_failures.inc()
            raise errors.bad_password(user)
        return principal

    async def _connect_backend(
        self,
        inbox: Inbox,
        job: JobRoute,
        request: Startup,
        pipelined: bytes,
        slot: object | None,
    ) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reuse = (pool_key(job.host, job.port, job.user, job.database, request.forwarded)
                 if self.pool.enabled else None)
        if reuse is not None and (pooled := self.pool.take(job.job_id, reuse)) is not None:
            # A backend a client of the same key left, reset: no fork, no login.
            inbox.write(b"".join(pooled.status))
            self.metrics.backend_connect.observe(loop.time() - started)
            if self._splice(inbox, pooled.inbox, job, request, Ready(b"I", b""), pooled.key,
                            pipelined, slot, (reuse, pooled.status)):
                return True
            pooled.close()
            return False
        for _ in range(CROWDED_RETRIES):
            try:
                return await self._log_in(inbox, job, request, reuse, pipelined, slot, started)
            except Crowded:
                # PostgreSQL is full, partly of connections kept idle for clients of other
                # startup parameters: close the job's oldest kept one, then try again.
                if not await self.pool.evict_oldest(job.job_id):
                    break
        return await self._log_in(inbox, job, request, None, pipelined, slot, started)

    async def _log_in(self, inbox: Inbox, job: JobRoute, request: Startup,
                      reuse: PoolKey | None, pipelined: bytes, slot: object | None,
                      started: float) -> bool:
        """A fresh backend connection, logged in and spliced (``reuse``: poolable, and a
        53300 from a backend whose job has kept connections raises Crowded)."""
        loop = asyncio.get_running_loop()
        crowded = (lambda: self.pool.idle_count(job.job_id) > 0) if reuse is not None else None
        try:
            backend, ready, key, status = await open_backend(
                job, request.forwarded, inbox.write, self.config.connect_timeout, crowded)
        except Refused as exc:  # the backend said no: the client hears its ErrorResponse
            self.metrics.errors.labels(exc.code).inc()
            inbox.write(exc.raw)
            inbox.close()
            return False
        self.metrics.backend_connect.observe(loop.time() - started)
        spliced = self._splice(inbox, backend, job, request, ready, key, pipelined, slot,
                               None if reuse is None else (reuse, self._shared(status)))
        if not spliced:
            backend.close()
        return spliced

    def _splice(
        self,
        inbox: Inbox,
        backend: Inbox,
        job: JobRoute,
        request: Startup,
        ready: Ready,
        key: KeyData,
        pipelined: bytes,
        slot: object | None,
        reuse: tuple[PoolKey, list[bytes]] | None = None,
    ) -> bool:
        if inbox.closed or backend.closed:
            inbox.close()
            backend.close()
            return False
        # The client is told its backend's real pid (pg_backend_pid(), NOTIFY's sender)
        # and a secret of the router's own, as long as its protocol allows.
        backend_key = BackendKey(job.host, job.port, key.pid, key.secret)
        secret = self.cancel_map.issue(backend_key, request.key_length)
        inbox.write(pg.backend_key_data(key.pid, secret) + pg.ready_for_query(ready.status))
        session = Session(job, request.user, secret, key.pid, slot)
        self.assignments[job.job_id] += 1
        if reuse is not None:
            session.reuse = (reuse[0], key, reuse[1])
        self.sessions.add(session)
        self._job_sessions[job.job_id] += 1
        self._drained.clear()
        assert inbox.transport is not None and backend.transport is not None
        if session.reuse is not None:
            session.feed = ClientFeed(backend.transport.write, inbox.transport.close)
        session.spliced(splice(
            inbox.transport, backend.transport, lambda survivor: self._ended(session, survivor),
            session.feed,
        ))
        to_backend = pipelined + inbox.take_buffered()
        if to_backend:
            (session.feed or backend.transport.write)(to_backend)
        to_client = ready.leftover + backend.take_buffered()
        if to_client:
            inbox.transport.write(to_client)
        inbox.transport.resume_reading()
        return True

    def _ended(self, session: Session, survivor: Pipe) -> bool:
        """A session is over; True when its backend is kept (to be reset and pooled)."""
        session.freeze_bytes(survivor)
        self._forget(session)
        if (session.reuse is None or self._stopping or session.pipes is None
                or survivor is not session.pipes[1]):
            return False  # the backend went (or the router stops): nothing to keep
        pool_as, key, status = session.reuse
        # The backend's protocol changes now, not in the task: uvloop hands a transport's
        # reads to what it had when its protocol was set (the gone client's write).
        held = self.pool.hold(survivor.transport)
        task = asyncio.get_running_loop().create_task(
            self._keep(session.job_id, pool_as, held, key, status))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)
        return True

    def _forget(self, session: Session) -> None:
        self.sessions.discard(session)
        self._job_sessions[session.job_id] -= 1
        if self._job_sessions[session.job_id] <= 0:
            del self._job_sessions[session.job_id]
            if self.activity is not None:
                self.activity.last_session_ended(session.job_id)
        self.cancel_map.release(session.backend_pid, session.cancel_secret)
        self.metrics.session_finished(session)
        if session.slot is not None:
            self._release_slot(session.slot)
        if not self.sessions:
            self._drained.set()

    async def _keep(self, job_id: str, pool_as: PoolKey, backend: Inbox,
                    key: KeyData, status: list[bytes]) -> None:
        pooled = await self.pool.reset(backend, key, status)
        if pooled is None:
            log.debug("job %s: a backend its client left was not idle: closed", job_id)
        elif self._stopping:
            pooled.close()
        else:
            self.pool.put(job_id, pool_as, pooled)


def _source(inbox: Inbox) -> str:
    """The client's address, whose cancels that match no key are rate-limited."""
    peer = inbox.transport.get_extra_info("peername") if inbox.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "local")
