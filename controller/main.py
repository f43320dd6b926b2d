"""``jobmesh controller``: the reconciler, a backend, and the HTTP API in one process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.backend import Backend
from controller.catalog import Catalog, CatalogError
from controller.metrics import ControllerMetrics
from controller.reconciler import Reconciler, ReconcilerConfig

log = logging.getLogger("jobmesh.controller")


class UsageError(CatalogError):
    """A flag or setting that cannot work; one line for the user."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--catalog-dsn", default=env("JOBMESH_CATALOG_DSN"), metavar="DSN",
                   help="the catalog PostgreSQL (env JOBMESH_CATALOG_DSN)")
    p.add_argument("--backend", choices=["local"], default="local",
                   help="where jobs run (default local: processes on this machine)")
    p.add_argument("--state-dir", type=Path, default=Path(env("JOBMESH_STATE_DIR", ".jobmesh")),
                   metavar="DIR", help="the local backend keeps jobs under DIR/jobs "
                   "(env JOBMESH_STATE_DIR, default ./.jobmesh)")
    p.add_argument("--store", default=env("JOBMESH_STORE"), metavar="URL",
                   help="file:///path or s3://bucket/prefix (default file://DIR/store)")
    p.add_argument("--s3-endpoint", default=env("JOBMESH_S3_ENDPOINT"), metavar="URL")
    p.add_argument("--api-listen", default=env("JOBMESH_API_LISTEN", "127.0.0.1:6480"),
                   metavar="HOST:PORT", help="the HTTP API and /metrics (default 127.0.0.1:6480)")
    p.add_argument("--api-token-file", type=Path, metavar="FILE",
                   help="the API's bearer token (default DIR/api-token, created if missing)")
    p.add_argument("--idle-timeout", type=float, default=600, metavar="S",
                   help="pause jobs with no client for S seconds (default 600; 0: never)")
    p.add_argument("--max-running", type=int, metavar="N",
                   help="at most N jobs running; a wake beyond pauses the least recently "
                   "active idle job first")
    p.add_argument("--archive-timeout", type=int, default=60, metavar="S",
                   help="jobs' archive_timeout: the data at risk from a crash (default 60)")
    p.add_argument("--base-backup-interval", type=float, default=3600, metavar="S")
    p.add_argument("--resync-interval", type=float, default=30, metavar="S")
    p.add_argument("--health-interval", type=float, default=2, metavar="S")
    p.add_argument("--quiet-for", type=float, default=15, metavar="S",
                   help="a job without sessions for S seconds may be evicted (default 15)")


@dataclass
class ControllerSettings:
    catalog_dsn: str
    state_dir: Path
    store: str
    s3_endpoint: str | None
    api_host: str
    api_port: int
    token: str
    reconciler: ReconcilerConfig
    archive_timeout: int
    base_backup_interval: float


def settings_from(args: argparse.Namespace) -> ControllerSettings:
    from controller.mesh import ensure_secret

    if not args.catalog_dsn:
        raise UsageError("--catalog-dsn (or JOBMESH_CATALOG_DSN) is required")
    if args.max_running is not None and args.max_running < 1:
        raise UsageError("--max-running must be at least 1")
    host, _, port = args.api_listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--api-listen {args.api_listen!r}: expected HOST:PORT")
    state = args.state_dir.absolute()
    state.mkdir(parents=True, exist_ok=True)
    return ControllerSettings(
        catalog_dsn=args.catalog_dsn, state_dir=state,
        store=args.store or f"file://{state / 'store'}", s3_endpoint=args.s3_endpoint,
        api_host=host, api_port=int(port),
        token=ensure_secret(args.api_token_file or state / "api-token"),
        reconciler=ReconcilerConfig(
            resync_interval=args.resync_interval, health_interval=args.health_interval,
            idle_timeout=args.idle_timeout or None, max_running=args.max_running,
            quiet_for=args.quiet_for),
        archive_timeout=args.archive_timeout, base_backup_interval=args.base_backup_interval)


def make_backend(s: ControllerSettings) -> Backend:
    from controller.local_backend import LocalBackend

    return LocalBackend(s.state_dir, s.store, s3_endpoint=s.s3_endpoint,
                        archive_timeout=s.archive_timeout,
                        base_backup_interval=s.base_backup_interval)


async def serve(s: ControllerSettings, stop: asyncio.Event,
                ready: asyncio.Event | None = None) -> None:
    """Run until ``stop``: migrate the catalog, reconcile, serve the API and metrics."""
    from agent.store import open_store
    from controller.api import build_app

    catalog = await Catalog.connect(s.catalog_dsn, max_size=10)
    store = open_store(s.store, s3_endpoint=s.s3_endpoint)
    runner: web.AppRunner | None = None
    try:
        await catalog.migrate()
        metrics = ControllerMetrics()
        app = build_app(catalog, token=s.token, store=store, state_dir=s.state_dir)

        async def scrape(_req: web.Request) -> web.Response:
            return web.Response(body=generate_latest(metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})
        app.router.add_get("/metrics", scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.api_host, s.api_port)
        await site.start()
        log.info("controller API listening on http://%s:%d", s.api_host, s.api_port)
        reconciler = Reconciler(catalog, make_backend(s), s.reconciler, metrics)
        if ready is not None:
            ready.set()
        await reconciler.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
        await catalog.close()


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(settings, stop)

    try:
        import uvloop
        uvloop.run(main())
    except CatalogError as exc:
        raise UsageError(str(exc)) from exc
    return 0
