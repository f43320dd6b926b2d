"""The admin console: ``dbname=jobmesh`` (or ``pgbouncer``), PgBouncer-compatible.

``psql "host=... dbname=jobmesh user=<admin principal>"`` gets PgBouncer's
``SHOW`` commands with PgBouncer's column names and types where the concept
exists, so that existing tools (exporters, dashboards, habits) work, plus
``SHOW JOBS``; ``KILL_CLIENT id`` and ``RELOAD`` act. Admin principals may do
everything, stats principals (PgBouncer's ``stats_users``) only ``SHOW``,
everyone else is refused with ``42501`` at login.

What the console shows is the worker it landed on (``--workers N``: each
worker is a console of its own, as each PgBouncer process under
``so_reuseport`` is). Session mode splices bytes without parsing them, so
the counts of queries and transactions in ``SHOW STATS`` are 0; bytes are
real. Only the simple query protocol is spoken.

At ~540 lines it is one console: most of it is the tables of PgBouncer's SHOW
commands, column for column, which read best beside each other; the acting
commands are a few short methods at the end. The next split, if it grows, is
the SHOW tables into a module of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import protocol as pg
from .errors import ClientError
from .inbox import ConnectionClosed, Inbox
from .pauses import ALL
from .routes import job_id_from_database

if TYPE_CHECKING:
    from .server import Router

log = logging.getLogger(__name__)

TEXT, INT8 = 25, 20

try:
    VERSION = version("jobmesh")
except PackageNotFoundError:  # pragma: no cover - run from a source tree without metadata
    VERSION = "0"

HELP = ("SHOW HELP|VERSION|POOLS|CLIENTS|SERVERS|DATABASES|STATS|STATS_TOTALS|STATS_AVERAGES|"
        "LISTS|CONFIG|USERS|JOBS; "
        "KILL_CLIENT id; RELOAD; PAUSE [job_x]; RESUME [job_x]; SNAPSHOT_STOP job_x; "
        "WAKE job_x")


class ConsoleError(Exception):
    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate, self.message, self.hint = sqlstate, message, hint


Table = tuple[list[tuple[str, int]], list[list[Any]]]


def row_description(columns: list[tuple[str, int]]) -> bytes:
    body = len(columns).to_bytes(2, "big")
    for name, oid in columns:
        size = 8 if oid == INT8 else -1
        body += (name.encode() + b"\0" + (0).to_bytes(4, "big") + (0).to_bytes(2, "big")
                 + oid.to_bytes(4, "big") + size.to_bytes(2, "big", signed=True)
                 + (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big"))
    return pg.message(b"T", body)


def data_row(values: list[Any]) -> bytes:
    body = len(values).to_bytes(2, "big")
    for v in values:
        if v is None:
            body += (-1).to_bytes(4, "big", signed=True)
        else:
            raw = str(int(v) if isinstance(v, bool) else v).encode()
            body += len(raw).to_bytes(4, "big") + raw
    return pg.message(b"D", body)


def command_complete(tag: str) -> bytes:
    return pg.message(b"C", tag.encode() + b"\0")


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _addr(transport: asyncio.BaseTransport | None, which: str) -> tuple[str, int]:
    info = transport.get_extra_info(which) if transport is not None else None
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return "unix", 0


class Console:
    """One admin console connection, after its principal logged in."""

    def __init__(self, router: Router, inbox: Inbox, user: str, *, admin: bool) -> None:
        self.router = router
        self.inbox = inbox
        self.user = user
        self.admin = admin
        self.commands: dict[str, Callable[[list[str]], Table | str]] = {
            "SHOW HELP": lambda _: ([("help", TEXT)], [[HELP]]),
            "SHOW VERSION": self.show_version, "SHOW POOLS": self.show_pools,
            "SHOW CLIENTS": self.show_clients, "SHOW SERVERS": self.show_servers,
            "SHOW DATABASES": self.show_databases, "SHOW STATS": self.show_stats,
            "SHOW LISTS": self.show_lists, "SHOW CONFIG": self.show_config,
            "SHOW USERS": self.show_users, "SHOW JOBS": self.show_jobs,
            "SHOW STATS_TOTALS": self.show_stats_totals,
            "SHOW STATS_AVERAGES": self.show_stats_averages,
            "KILL_CLIENT": self.kill_client, "RELOAD": self.reload,
        }
        self.actions: dict[str, Callable[[list[str]], Awaitable[str]]] = {
            "PAUSE": self.pause, "RESUME": self.resume, "SNAPSHOT_STOP": self.snapshot_stop,
            "WAKE": self.wake,
        }

    async def serve(self, pipelined: bytes = b"") -> None:
        """Until the client leaves; ``pipelined``: what it sent after its password."""
        self.inbox.write(pg.parameter_status("server_version", f"{VERSION}/jobmesh")
                         + pg.parameter_status("client_encoding", "UTF8")
                         + pg.parameter_status("standard_conforming_strings", "on")
                         + pg.ready_for_query())
        frames = pg.FrameBuffer()
        frames.feed(pipelined)
        failed_extended = False
        while True:
            msg = frames.next_message(pg.MAX_AUTH_MESSAGE)
            if msg is None:
                try:
                    frames.feed(await self.inbox.read())
                except ConnectionClosed:
                    return
                continue
            if msg.type == b"X":
                self.inbox.close()
                return
            if msg.type == b"Q":
                answer = await self.run(msg.body.rstrip(b"\0").decode(errors="replace"))
                self.inbox.write(answer + pg.ready_for_query())
            elif msg.type == b"S":
                if failed_extended:
                    failed_extended = False
                    self.inbox.write(pg.error_response(
                        "0A000", "the admin console speaks the simple query protocol only",
                        "Use psql, or your driver's simple protocol.", severity="ERROR"))
                self.inbox.write(pg.ready_for_query())
            else:
                failed_extended = True  # Parse, Bind...: answered at their Sync

    async def run(self, sql: str) -> bytes:
        out = b""
        for statement in (s.strip() for s in sql.split(";")):
            if not statement:
                continue
            try:
                action = self.actions.get(statement.split()[0].upper())
                if action is not None:
                    self._may_act()
                    out += command_complete(await action(statement.split()[1:]))
                    continue
                out += self.execute(statement)
            except ConsoleError as exc:
                return out + pg.error_response(exc.sqlstate, exc.message, exc.hint,
                                               severity="ERROR")
        return out or pg.message(b"I")  # EmptyQueryResponse

    def execute(self, statement: str) -> bytes:
        words = statement.split()
        upper = [w.upper() for w in words]
        name = " ".join(upper[:2]) if upper[0] == "SHOW" else upper[0]
        handler = self.commands.get(name)
        if handler is None:
            raise ConsoleError("42601", f"unknown admin console command: {statement}",
                               f"Commands: {HELP}.")
        if not name.startswith("SHOW"):
            self._may_act()
        result = handler(words[2:] if name.startswith("SHOW") else words[1:])
        if isinstance(result, str):
            return command_complete(result)
        columns, rows = result
        return (row_description(columns) + b"".join(data_row(r) for r in rows)
                + command_complete("SHOW"))

    # --- SHOW ------------------------------------------------------------------------------

    def _jobs(self) -> dict[str, Any]:
        return dict(getattr(self.router.routes, "jobs", {}))

    def _route(self, job_id: str) -> Any:
        return self.router.routes.route(job_id, "write")

    def show_version(self, _: list[str]) -> Table:
        return [("version", TEXT)], [[f"jobmesh router {VERSION} (PgBouncer-compatible console)"]]

    def show_pools(self, _: list[str]) -> Table:
        cols = [(c, INT8 if c.startswith(("cl_", "sv_", "maxwait")) else TEXT) for c in (
            "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
            "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled",
            "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us",
            "pool_mode", "load_balance_hosts")]
        active: dict[tuple[str, str], int] = {}
        for s in self.router.sessions:
            if s.tx is None:
                key = (f"job_{s.job_id}", s.job.user)
                active[key] = active.get(key, 0) + 1
        idle = self.router.pool.idle_by_user()
        rows = []
        for db, user in sorted(set(active) | {(f"job_{j}", u) for j, u in idle}):
            job = db.removeprefix("job_")
            rows.append([db, user, active.get((db, user), 0), 0, 0, 0, active.get((db, user), 0),
                         0, 0, idle.get((job, user), 0), 0, 0, 0, 0, 0, "session", None])
        return cols, rows + self._transaction_pools()

    def _transaction_pools(self) -> list[list[Any]]:
        """SHOW POOLS rows of transaction-mode jobs: clients logged in, clients waiting for a
        server, servers in a transaction, servers idle, servers logging in."""
        counts: dict[tuple[str, str], list[int]] = {}

        def add(job_id: str, user: str, column: int, n: int = 1) -> None:
            counts.setdefault((f"job_{job_id}", user), [0] * 5)[column] += n

        for s in self.router.sessions:
            if s.tx is not None:
                add(s.job_id, s.job.user, 0)
                if s.tx.backend is not None:
                    add(s.job_id, s.job.user, 2)
        now = asyncio.get_running_loop().time()
        waited: dict[tuple[str, str], float] = {}
        for job_id, pool in self.router.tx_pools.items():
            for w in pool.waiters:
                add(job_id, w.key[2], 1)
                since = w.notify_at - self.router.config.query_wait_notify
                where = (f"job_{job_id}", w.key[2])
                waited[where] = max(waited.get(where, 0.0), now - since)
            for pool_key, backends in pool.idle.items():
                add(job_id, pool_key[2], 3, len(backends))
            busy = sum(1 for s in self.router.sessions
                       if s.tx is not None and s.job_id == job_id and s.tx.backend is not None)
            logging_in = pool.count - pool.idle_count() - busy
            if logging_in > 0:
                add(job_id, "", 4, logging_in)
        rows = []
        for (db, user), (clients, waiting, active, idle, login) in sorted(counts.items()):
            wait = waited.get((db, user), 0.0)
            rows.append([db, user, clients - waiting, waiting, 0, 0, active, 0, 0, idle, 0, 0,
                         login, int(wait), int(wait % 1 * 1e6), "transaction", None])
        return rows

    def _clients(self) -> list[list[Any]]:
        rows = []
        for s in sorted(self.router.sessions, key=lambda s: s.id):
            client = s.tx.transport if s.tx is not None else (
                s.pipes[0].transport if s.pipes else None)
            addr, port = _addr(client, "peername")
            local, lport = _addr(client, "sockname")
            if s.tx is not None:  # linked to a server only while a transaction runs
                state = "waiting" if s.tx.waiter is not None else "active"
                link = f"{id(s.tx.backend):x}" if s.tx.backend is not None else ""
                prepared = len(s.tx.statements)
            else:
                state, link = "active", f"{id(s.pipes[1]) if s.pipes else 0:x}"
                prepared = 0
            rows.append(["C", s.user, f"job_{s.job_id}", "none", state, addr, port, local,
                         lport, _when(s.connected_at), _when(s.connected_at), 0, 0, 0,
                         f"{id(s):x}", link, 0, "", "", prepared, s.id])
        return rows

    _CLIENT_COLUMNS = [
        ("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
        ("state", TEXT), ("addr", TEXT), ("port", INT8), ("local_addr", TEXT),
        ("local_port", INT8), ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT8),
        ("wait_us", INT8), ("close_needed", INT8), ("ptr", TEXT), ("link", TEXT),
        ("remote_pid", INT8), ("tls", TEXT), ("application_name", TEXT),
        ("prepared_statements", INT8), ("id", INT8)]

    def show_clients(self, _: list[str]) -> Table:
        return self._CLIENT_COLUMNS, self._clients()

    def show_servers(self, _: list[str]) -> Table:
        rows = []
        for s in sorted(self.router.sessions, key=lambda s: s.id):
            if s.tx is not None:
                continue  # (a transaction-mode client's server is listed below, if any)
            backend = s.pipes[1].transport if s.pipes else None
            addr, port = _addr(backend, "peername")
            local, lport = _addr(backend, "sockname")
            rows.append(["S", s.job.user, f"job_{s.job_id}", "none", "active", addr, port,
                         local, lport, _when(s.connected_at), _when(s.connected_at), 0, 0, 0,
                         f"{id(s.pipes[1]) if s.pipes else 0:x}", f"{id(s):x}", s.backend_pid,
                         "", "", 0, s.id])
        for job_id, pool in self.router.tx_pools.items():
            for pool_key, backends in pool.idle.items():
                for b in backends:
                    addr, port = _addr(b.transport, "peername")
                    local, lport = _addr(b.transport, "sockname")
                    rows.append(["S", pool_key[2], f"job_{job_id}", "none", "idle", addr, port,
                                 local, lport, None, None, 0, 0, 0, f"{id(b):x}", "",
                                 b.cancel.pid, "", "", len(b.prepared), 0])
        for s in sorted(self.router.sessions, key=lambda s: s.id):
            lent = s.tx.backend if s.tx is not None else None
            if lent is not None:
                addr, port = _addr(lent.transport, "peername")
                local, lport = _addr(lent.transport, "sockname")
                rows.append(["S", s.job.user, f"job_{s.job_id}", "none", "active", addr, port,
                             local, lport, None, None, 0, 0, 0, f"{id(lent):x}", f"{id(s):x}",
                             lent.cancel.pid, "", "", len(lent.prepared), 0])
        for job_id, user, pooled in self.router.pool.all_idle():
            addr, port = _addr(pooled.inbox.transport, "peername")
            local, lport = _addr(pooled.inbox.transport, "sockname")
            since = time.time() - (asyncio.get_running_loop().time() - pooled.since)
            rows.append(["S", user, f"job_{job_id}", "none", "idle", addr, port, local, lport,
                         _when(since), _when(since), 0, 0, 0, f"{id(pooled):x}", "",
                         pooled.key.pid, "", "", 0, 0])
        return self._CLIENT_COLUMNS, rows

    def show_databases(self, _: list[str]) -> Table:
        ints = {"port", "pool_size", "min_pool_size", "reserve_pool_size", "server_lifetime",
                "max_connections", "current_connections", "max_client_connections",
                "current_client_connections", "paused", "disabled"}
        cols = [(c, INT8 if c in ints else TEXT) for c in (
            "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
            "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
            "max_connections", "current_connections", "max_client_connections",
            "current_client_connections", "paused", "disabled")]
        clients = self._per_job_sessions()
        rows = []
        for job_id, job in sorted(self._jobs().items()):
            route = self._route(job_id)
            n, idle = clients.get(job_id, 0), self.router.pool.idle_count(job_id)
            size = (route.pool_size if route else None) or self.router.config.pool_size
            tx = self.router.tx_pools.get(job_id)
            servers = tx.count if tx is not None else n + idle
            paused = int(self.router.pauses.hold_for(job_id) is not None)
            rows.append([f"job_{job_id}", route.host if route else None,
                         route.port if route else None, route.database if route else None,
                         route.user if route else None, size, 0, 0, 0, job.pool_mode, None,
                         job.max_connections or 0, servers, 0, n, paused, 0])
        return cols, rows

    def _per_job_sessions(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.router.sessions:
            counts[s.job_id] = counts.get(s.job_id, 0) + 1
        return counts

    def show_stats(self, _: list[str]) -> Table:
        names = ["database", "total_xact_count", "total_query_count",
                 "total_server_assignment_count", "total_received", "total_sent",
                 "total_xact_time", "total_query_time", "total_wait_time",
                 "total_client_parse_count", "total_server_parse_count", "total_bind_count",
                 "total_client_login_count", "avg_xact_count", "avg_query_count",
                 "avg_server_assignment_count", "avg_recv", "avg_sent", "avg_xact_time",
                 "avg_query_time", "avg_wait_time", "avg_client_parse_count",
                 "avg_server_parse_count", "avg_bind_count", "avg_client_login_count"]
        cols = [(n, TEXT if n == "database" else INT8) for n in names]
        totals = self.router.metrics.byte_totals(self.router.sessions)
        assigned = self.router.assignments
        rows = []
        xacts: dict[str, int] = dict(self.router.tx_transactions)
        for s in self.router.sessions:
            if s.tx is not None:
                xacts[s.job_id] = xacts.get(s.job_id, 0) + s.tx.transactions
        for job_id in sorted(set(self._jobs()) | {j for j, _ in totals} | set(assigned)):
            n = xacts.get(job_id, 0)
            row: list[Any] = [f"job_{job_id}", n, n, assigned.get(job_id, 0) + n,
                              totals.get((job_id, "in"), 0), totals.get((job_id, "out"), 0),
                              0, 0, 0, 0, 0, 0, assigned.get(job_id, 0)]
            rows.append(row + [0] * (len(names) - len(row)))
        return cols, rows

    def show_stats_totals(self, _: list[str]) -> Table:
        """SHOW STATS's totals under PgBouncer's STATS_TOTALS names (what pgbouncer_exporter
        reads)."""
        cols, rows = self.show_stats([])
        names = [c for c, _ in cols]
        wanted = {"database": "database", "total_xact_count": "xact_count",
                  "total_query_count": "query_count",
                  "total_server_assignment_count": "server_assignment_count",
                  "total_received": "bytes_received", "total_sent": "bytes_sent",
                  "total_xact_time": "xact_time", "total_query_time": "query_time",
                  "total_wait_time": "wait_time",
                  "total_client_parse_count": "client_parse_count",
                  "total_server_parse_count": "server_parse_count",
                  "total_bind_count": "bind_count"}
        index = [names.index(n) for n in wanted]
        return ([(wanted[names[i]], cols[i][1]) for i in index],
                [[r[i] for i in index] for r in rows])

    def show_stats_averages(self, _: list[str]) -> Table:
        cols, rows = self.show_stats([])
        index = [0] + [i for i, (c, _) in enumerate(cols) if c.startswith("avg_")]
        return ([(cols[i][0].removeprefix("avg_"), cols[i][1]) for i in index],
                [[r[i] for i in index] for r in rows])

    def show_lists(self, _: list[str]) -> Table:
        r = self.router
        pools = len(self.show_pools([])[1])
        items = [("databases", len(self._jobs())), ("users", len(getattr(r.routes, "users", {}))),
                 ("pools", pools),
                 ("free_clients", 0), ("used_clients", len(r.sessions)),
                 ("login_clients", len(r._handshakes)), ("free_servers", 0),
                 ("used_servers", sum(1 for s in r.sessions if s.tx is None)
                  + r.pool.idle_count() + sum(p.count for p in r.tx_pools.values())),
                 ("dns_names", 0),
                 ("dns_zones", 0), ("dns_queries", 0), ("dns_pending", 0)]
        return [("list", TEXT), ("items", INT8)], [list(i) for i in items]

    def show_config(self, _: list[str]) -> Table:
        c = self.router.config
        settings = [("listen_addr", c.host), ("listen_port", c.port),
                    ("max_client_conn", c.max_client_conn), ("max_user_connections", 0),
                    ("default_pool_size", c.pool_size),
                    ("server_idle_timeout", c.server_idle_timeout), ("pool_mode", "session"),
                    ("query_wait_timeout", c.query_wait_timeout),
                    ("query_wait_notify", c.query_wait_notify),
                    ("max_prepared_statements", c.max_prepared_statements),
                    ("server_reset_query", "DISCARD ALL"), ("auth_type", "scram-sha-256"),
                    ("client_tls_sslmode", "require" if c.require_tls else
                     "allow" if c.tls else "disable"),
                    ("server_connect_timeout", c.connect_timeout),
                    ("client_login_timeout", c.startup_timeout),
                    ("shutdown_timeout", c.shutdown_timeout), ("wake_timeout", c.wake_timeout),
                    ("workers", c.workers), ("peer_id", c.worker_index)]
        return ([("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)],
                [[k, _fmt(v), None, "no"] for k, v in settings])

    def show_users(self, _: list[str]) -> Table:
        users = getattr(self.router.routes, "users", {})
        cols = [("name", TEXT), ("pool_size", INT8), ("reserve_pool_size", INT8),
                ("pool_mode", TEXT), ("max_user_connections", INT8),
                ("current_connections", INT8), ("max_user_client_connections", INT8),
                ("current_client_connections", INT8)]
        rows = []
        for name in sorted(users):
            n = sum(1 for s in self.router.sessions if s.user == name)
            rows.append([name, None, None, None, 0, n, 0, n])
        return cols, rows

    def show_jobs(self, _: list[str]) -> Table:
        cols = [("job", TEXT), ("state", TEXT), ("desired_state", TEXT), ("host", TEXT),
                ("port", INT8), ("clients", INT8), ("servers_idle", INT8),
                ("max_connections", INT8), ("last_active", TEXT), ("running_since", TEXT)]
        clients = self._per_job_sessions()
        rows = []
        for job_id, job in sorted(self._jobs().items()):
            row = getattr(job, "row", None)  # the catalog's; a route file's job has none
            route = self._route(job_id)
            state = str(row.state) if row is not None else "static"
            rows.append([job_id, state, str(row.desired_state) if row is not None else None,
                         route.host if route else None, route.port if route else None,
                         clients.get(job_id, 0), self.router.pool.idle_count(job_id),
                         job.max_connections,
                         _fmt(row.last_active) if row is not None else None,
                         _fmt(row.updated_at) if row is not None and state == "running"
                         else None])
        return cols, rows

    # --- acting ----------------------------------------------------------------------------

    def kill_client(self, args: list[str]) -> str:
        if len(args) != 1 or not args[0].isdigit():
            raise ConsoleError("42601", "KILL_CLIENT takes a client id (SHOW CLIENTS, id)")
        wanted = int(args[0])
        for s in list(self.router.sessions):
            if s.id == wanted:
                s.close()
                log.info("admin %s: KILL_CLIENT %d (job %s)", self.user, wanted, s.job_id)
                return "KILL_CLIENT"
        raise ConsoleError("42704", f"no client {wanted}", "SHOW CLIENTS lists their ids.")

    def reload(self, _: list[str]) -> str:
        self.router.request_reload()
        return "RELOAD"

    def _may_act(self) -> None:
        if not self.admin:
            raise ConsoleError("42501", f"{self.user} may only SHOW (a stats principal)",
                               "Log in as an admin principal to act.")

    def _job_arg(self, args: list[str], command: str, *, optional: bool = False) -> str | None:
        if not args and optional:
            return None
        if len(args) != 1:
            raise ConsoleError("42601", f"{command} takes one job's database name, job_<id>")
        job_id = job_id_from_database(args[0].strip('"'))
        if job_id is None or job_id not in self._jobs():
            raise ConsoleError("3D000", f"no job {args[0]}", "SHOW JOBS lists them.")
        return job_id

    async def pause(self, args: list[str]) -> str:
        """PgBouncer's PAUSE: hold the job's traffic; returns once it uses no server."""
        job_id = self._job_arg(args, "PAUSE", optional=True)
        log.info("admin %s: PAUSE %s", self.user, job_id or "(every job)")
        await self.router.pause(job_id or ALL)
        return "PAUSE"

    async def resume(self, args: list[str]) -> str:
        job_id = self._job_arg(args, "RESUME", optional=True)
        if not self.router.pauses.resume(job_id or ALL):
            raise ConsoleError("55000", f"{args[0] if args else 'the router'} is not paused",
                               f"Paused: {', '.join(self.router.pauses.paused()) or 'nothing'}.")
        log.info("admin %s: RESUME %s", self.user, job_id or "(every job)")
        return "RESUME"

    async def snapshot_stop(self, args: list[str]) -> str:
        """The job lifecycle's pause (snapshot, then stop), by a name no PgBouncer script
        uses: PAUSE only holds traffic."""
        job_id = self._job_arg(args, "SNAPSHOT_STOP")
        assert job_id is not None
        await self._lifecycle(job_id, "paused")
        return "SNAPSHOT_STOP"

    async def wake(self, args: list[str]) -> str:
        job_id = self._job_arg(args, "WAKE")
        assert job_id is not None
        await self._lifecycle(job_id, "running")
        return "WAKE"

    async def _lifecycle(self, job_id: str, desired: str) -> None:
        want = getattr(self.router.routes, "want", None)
        if want is None:
            raise ConsoleError("0A000", "a route file's jobs have no lifecycle",
                               "Jobs from the catalog do (jobmesh router --catalog-dsn).")
        log.info("admin %s: job %s wanted %s", self.user, job_id, desired)
        try:
            await want(job_id, desired, self.user)
        except ClientError as exc:
            raise ConsoleError(exc.sqlstate, exc.message, exc.hint) from exc


def _fmt(v: Any) -> str:
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)

