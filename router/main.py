"""``jobmesh router``: run the router from the command line.

Routes come from one of two sources: a static TOML file (``--routes``,
reloaded on SIGHUP) or the jobmesh catalog (``--catalog-dsn`` or
``JOBMESH_CATALOG_DSN``; followed with LISTEN/NOTIFY, SIGHUP forces a full
reload). Only the catalog can wake paused jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import resource
import signal
from pathlib import Path

import uvloop
from prometheus_client import start_http_server

from jobmesh.errors import UsageError
from jobmesh.secretfile import read_secret_file

from .activity import ActivityReporter
from .catalog_routes import CATALOG_ERRORS, CatalogConfigError, CatalogRoutes
from .config import RouterConfig
from .leases import Leases
from .metrics import RouterMetrics
from .routes import RouteFileError, RouteTable, load_routes
from .server import Router
from .supervisor import Supervisor
from .tls import TLSConfigError, server_context

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RouterConfig()  # its defaults are the flags' defaults
    p.add_argument("--listen", default=f"{d.host}:{d.port}", metavar="HOST:PORT",
                   help=f"where clients connect (default {d.host}:{d.port}; port 0: any)")
    p.add_argument("--routes", metavar="FILE", help="a static route file (TOML)")
    p.add_argument(
        "--catalog-dsn", metavar="DSN",
        help="take jobs, users and grants from the jobmesh catalog, and wake paused jobs"
             " (default: $JOBMESH_CATALOG_DSN unless --routes is given); it holds a"
             " password: prefer --catalog-dsn-file, as anyone can read a command line",
    )
    p.add_argument(
        "--catalog-dsn-file", type=Path, metavar="FILE",
        help="read the catalog DSN from FILE (mode 0600; env JOBMESH_CATALOG_DSN_FILE)",
    )
    p.add_argument(
        "--wake-timeout", type=float, default=d.wake_timeout, metavar="S",
        help=f"how long a client waits for its paused job to wake (default {d.wake_timeout:g})",
    )
    p.add_argument(
        "--activity-interval", type=float, default=d.activity_interval, metavar="S",
        help="how often to tell the catalog which jobs have sessions "
        f"(default {d.activity_interval:g})",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="the server certificate (PEM) for TLS")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--require-tls", action="store_true", help="refuse cleartext clients (28000)")
    p.add_argument(
        "--cleartext-over-tls",
        action="store_true",
        help="over TLS, ask for a cleartext password instead of SCRAM",
    )
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--max-client-conn", type=int, default=d.max_client_conn, metavar="N",
                   help=f"client connections per worker; more are refused "
                   f"(default {d.max_client_conn})")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout, metavar="S",
                   help="a client must finish its startup and authentication within S "
                   f"seconds (default {d.startup_timeout:g})")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout, metavar="S",
                   help="how long to try to reach a running job's PostgreSQL "
                   f"(default {d.connect_timeout:g})")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout, metavar="S",
                   help="on SIGTERM, how long sessions may finish before they are cut "
                   f"(default {d.shutdown_timeout:g})")
    p.add_argument(
        "--workers", type=int, default=d.workers, metavar="N",
        help=f"worker processes sharing the listener (default {d.workers}; one per core uses "
        "every core)",
    )
    p.add_argument(
        "--pool-size", type=int, default=d.pool_size, metavar="N",
        help="backend connections a job's leaving clients leave behind, reset with DISCARD "
        f"ALL and kept for its next clients (default {d.pool_size}; 0: close them)",
    )
    p.add_argument(
        "--server-idle-timeout", type=float, default=d.server_idle_timeout, metavar="S",
        help="a kept backend connection is closed after S seconds unused "
        f"(default {d.server_idle_timeout:g})",
    )
    p.add_argument(
        "--query-wait-timeout", type=float, default=d.query_wait_timeout, metavar="S",
        help="transaction mode: how long a client waits for one of its job's pool_size "
        f"backend connections before 53300 (default {d.query_wait_timeout:g})",
    )
    p.add_argument(
        "--query-wait-notify", type=float, default=d.query_wait_notify, metavar="S",
        help="transaction mode: a waiting client is told so (a NOTICE) after S seconds "
        f"(default {d.query_wait_notify:g})",
    )
    p.add_argument(
        "--max-prepared-statements", type=int, default=d.max_prepared_statements, metavar="N",
        help="transaction mode: named prepared statements each backend connection keeps "
        f"for the clients it serves, least recently used closed first "
        f"(default {d.max_prepared_statements})",
    )
    p.add_argument(
        "--lease-ttl", type=float, default=d.lease_ttl, metavar="S",
        help="a job's max_connections holds across routers by slots each router leases "
        "from the catalog for S seconds, renewed every S/3 (a dead router's lapse after S; "
        f"default {d.lease_ttl:g})",
    )
    p.add_argument(
        "--peer-listen", metavar="HOST:PORT",
        help="hear the other routers of the fleet here: cancels whose key they did not issue"
        " (needs --peer-secret-file)",
    )
    p.add_argument(
        "--peer-advertise", metavar="HOST:PORT",
        help="with --catalog-dsn, the address the other routers reach --peer-listen at, "
        "registered in the catalog so that they find this router (default the "
        "--peer-listen address)",
    )
    p.add_argument(
        "--peer", action="append", default=[], metavar="HOST:PORT",
        help="another router's --peer-listen address, asked when a cancel's key is unknown "
        "here; repeatable; a name is resolved on every ask (a headless Service: every pod)",
    )
    p.add_argument(
        "--peer-secret-file", type=Path, metavar="FILE",
        help="the secret (at least 16 bytes, mode 0600) every router of the fleet shares: it "
        "authenticates forwarded cancels (env JOBMESH_ROUTER_PEER_SECRET_FILE)",
    )
    # Set by the supervisor for its workers; not for people.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--control-dir", help=argparse.SUPPRESS)


def parse_hostport(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{flag}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_config(args: argparse.Namespace) -> RouterConfig:
    host, port = parse_hostport(args.listen, "--listen")
    config = RouterConfig(
        host=host,
        port=port,
        require_tls=args.require_tls,
        cleartext_over_tls=args.cleartext_over_tls,
        max_client_conn=args.max_client_conn,
        startup_timeout=args.startup_timeout,
        connect_timeout=args.connect_timeout,
        shutdown_timeout=args.shutdown_timeout,
        wake_timeout=args.wake_timeout,
        activity_interval=args.activity_interval,
        workers=args.workers,
        worker_index=args.worker_index or 0,
        listen_fd=args.listen_fd,
        control_dir=args.control_dir,
        pool_size=args.pool_size,
        server_idle_timeout=args.server_idle_timeout,
        query_wait_timeout=args.query_wait_timeout,
        query_wait_notify=args.query_wait_notify,
        max_prepared_statements=args.max_prepared_statements,
        lease_ttl=args.lease_ttl,
    )
    if args.lease_ttl < 1:
        raise UsageError("--lease-ttl must be at least 1 second")
    if args.pool_size < 0 or args.server_idle_timeout <= 0:
        raise UsageError("--pool-size must be >= 0 and --server-idle-timeout positive")
    if args.query_wait_timeout <= 0 or args.query_wait_notify <= 0:
        raise UsageError("--query-wait-timeout and --query-wait-notify must be positive")
    if args.max_prepared_statements < 1:
        raise UsageError("--max-prepared-statements must be at least 1")
    if args.peer_listen:
        config.peer_listen = parse_hostport(args.peer_listen, "--peer-listen")
    if args.peer_advertise:
        if not args.peer_listen:
            raise UsageError("--peer-advertise needs --peer-listen")
        config.peer_advertise = parse_hostport(args.peer_advertise, "--peer-advertise")
    elif config.peer_listen is not None and config.peer_listen[0] in ("0.0.0.0", "::", ""):
        raise UsageError("--peer-listen on a wildcard address needs --peer-advertise (the "
                         "address the other routers reach this one at)")
    config.peers = [parse_hostport(p, "--peer") for p in args.peer]
    secret_file = args.peer_secret_file or os.environ.get("JOBMESH_ROUTER_PEER_SECRET_FILE")
    if (config.peer_listen or config.peers) and not secret_file:
        raise UsageError("--peer-listen and --peer need --peer-secret-file: forwarded cancels "
                         "are authenticated")
    if secret_file:
        secret = read_secret_file(Path(secret_file), "--peer-secret-file").encode()
        if len(secret) < 16:
            raise UsageError("--peer-secret-file: the secret must be at least 16 bytes")
        config.peer_secret = secret
    if not 1 <= args.workers <= 64:
        raise UsageError("--workers must be between 1 and 64")
    if args.wake_timeout <= 0 or args.activity_interval <= 0:
        raise UsageError("--wake-timeout and --activity-interval must be positive")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        try:
            config.tls, config.cert_pem = server_context(args.tls_cert, args.tls_key)
        except TLSConfigError as exc:
            raise UsageError(str(exc)) from exc
    if args.require_tls and config.tls is None:
        raise UsageError("--require-tls needs --tls-cert and --tls-key")
    return config


def raise_fd_limit() -> None:
    """Each session holds two sockets; lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def catalog_dsn(args: argparse.Namespace) -> str | None:
    """The catalog to follow, or None for a route file; exactly one of the two."""
    if args.catalog_dsn and args.catalog_dsn_file:
        raise UsageError("--catalog-dsn and --catalog-dsn-file are alternatives: give one")
    if args.routes and (args.catalog_dsn or args.catalog_dsn_file):
        raise UsageError("--routes and --catalog-dsn are alternatives: give one")
    if args.routes:
        return None
    dsn_file = args.catalog_dsn_file or (
        None if args.catalog_dsn else os.environ.get("JOBMESH_CATALOG_DSN_FILE"))
    if dsn_file:
        return read_secret_file(Path(dsn_file), "--catalog-dsn-file")
    dsn = args.catalog_dsn or os.environ.get("JOBMESH_CATALOG_DSN")
    if not dsn:
        raise UsageError("give --routes FILE or --catalog-dsn DSN (or set JOBMESH_CATALOG_DSN)")
    return dsn


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    raise_fd_limit()
    dsn = catalog_dsn(args)
    routes: RouteTable | None = None
    if dsn is None:
        try:
            routes = load_routes(args.routes)
        except RouteFileError as exc:
            raise UsageError(str(exc)) from exc
    metrics_at = parse_hostport(args.metrics, "--metrics") if args.metrics else None
    if args.worker_index is not None:
        _die_with_parent()
        uvloop.run(_serve(config, routes, args.routes, dsn, None, worker=True))
        return 0
    if config.workers > 1:
        supervisor = Supervisor(args.argv, config.workers, config.host, config.port, metrics_at)
        try:
            return supervisor.run()
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.listen}: {exc.strerror}") from exc
    uvloop.run(_serve(config, routes, args.routes, dsn, metrics_at))
    return 0


def _die_with_parent() -> None:
    """A worker must not outlive its supervisor (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)


async def _serve(
    config: RouterConfig,
    table: RouteTable | None,
    routes_path: str | None,
    dsn: str | None,
    metrics_at: tuple[str, int] | None,
    *,
    worker: bool = False,
) -> None:
    metrics = RouterMetrics()
    catalog: CatalogRoutes | None = None
    activity: ActivityReporter | None = None
    if dsn is not None:
        try:
            catalog = await CatalogRoutes.open(dsn, metrics, wake_timeout=config.wake_timeout)
        except CatalogConfigError as exc:
            raise UsageError(f"--catalog-dsn: {exc}") from exc
    routes = catalog or table
    assert routes is not None
    leases = (Leases(catalog.catalog, ttl=config.lease_ttl, renew=config.lease_ttl / 3,
                     errors=CATALOG_ERRORS) if catalog is not None else None)
    if catalog is not None and leases is not None:
        activity = ActivityReporter(
            functools.partial(catalog.report, leases.me),
            config.activity_interval)
    router = Router(config, routes, metrics=metrics, activity=activity, leases=leases,
                    registry_catalog=catalog.catalog if catalog is not None else None,
                    catalog_errors=CATALOG_ERRORS)
    try:
        await _run_router(router, catalog, routes_path, metrics_at, worker)
    finally:
        if catalog is not None:
            await catalog.close()


async def _run_router(
    router: Router,
    catalog: CatalogRoutes | None,
    routes_path: str | None,
    metrics_at: tuple[str, int] | None,
    worker: bool,
) -> None:
    config = router.config
    try:
        await router.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
    if metrics_at is not None:
        host, port = metrics_at
        try:
            start_http_server(port, host, registry=router.metrics.registry)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if catalog is not None:
        router.on_reload = catalog.resync
    else:
        assert routes_path is not None
        router.on_reload = lambda: _reload(router, routes_path)
    loop.add_signal_handler(signal.SIGHUP, router.request_reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if worker:
        log.info("router worker %d/%d serving", config.worker_index, config.workers)
        print("ready", flush=True)  # the supervisor waits for this line
    else:
        log.info("router listening on %s:%d (%s)", config.host, router.port, _summary(router))
    await stop.wait()
    log.info("shutting down: waiting up to %.0fs for %d sessions",
             config.shutdown_timeout, len(router.sessions))
    await router.shutdown()
    log.info("router stopped")


def _summary(router: Router) -> str:
    routes = router.routes
    if isinstance(routes, CatalogRoutes):
        if not routes.loaded:
            return "catalog unreachable; retrying"
        return f"{len(routes.jobs)} jobs, {len(routes.users)} users in the catalog"
    assert isinstance(routes, RouteTable)
    return f"{len(routes.jobs)} jobs, {len(routes.users)} users"


def _reload(router: Router, path: str) -> None:
    try:
        routes = load_routes(path)
    except RouteFileError as exc:
        log.error("routes not reloaded, keeping the previous ones: %s", exc)
        return
    router.reload(routes)
    log.info("routes reloaded: %d jobs, %d users", len(routes.jobs), len(routes.users))
