"""``jobmesh controller``: the reconciler, a backend, and the HTTP API in one process.

With ``--backend kubernetes`` several replicas may run: every replica serves
the HTTP API, and only the holder of the leader Lease (``controller.leader``)
runs the reconciler. A replica that loses the lease exits non-zero at once
(abandoning its in-flight work, which the next leader redoes: every backend
step is idempotent), and its Deployment starts it again as a candidate.

Over ~400 lines on purpose: the controller's flags, their checks and the
serve loop that wires them together, which read best side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobmesh import defaults
from jobmesh.errors import CommandFailed, UsageError
from jobmesh.secretfile import read_secret_file

from .catalog.db import Catalog
from .catalog.models import CatalogError
from .core.backend import Backend, BackendError
from .core.metrics import ControllerMetrics
from .core.reconciler import Reconciler, ReconcilerConfig
from .mesh import AGENT_KEY_FILE
from .storage.access import AccessError, StoreAccess, ensure_key_file
from .web.guard import WebConfig, WebConfigError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from .backends.kubernetes.leader import LeaderElector
    from .backends.local.backend import LocalBackend
    from .storage.keeper import Keeper

log = logging.getLogger("jobmesh.controller")


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--catalog-dsn", default=env("JOBMESH_CATALOG_DSN"), metavar="DSN",
                   help="the catalog PostgreSQL (env JOBMESH_CATALOG_DSN); it holds a "
                   "password: prefer --catalog-dsn-file, as anyone can read a command line")
    p.add_argument("--catalog-dsn-file", type=Path, metavar="FILE",
                   help="read the catalog DSN from FILE (mode 0600; env JOBMESH_CATALOG_DSN_FILE)")
    p.add_argument("--backend", choices=["local", "kubernetes"],
                   default=env("JOBMESH_BACKEND", "local"),
                   help="where jobs run: local (processes on this machine, the default) or "
                   "kubernetes (a pod per job; env JOBMESH_BACKEND)")
    p.add_argument("--state-dir", type=Path, default=defaults.state_dir(), metavar="DIR",
                   help="the local backend keeps jobs under DIR/jobs "
                   f"(env {defaults.STATE_DIR_ENV}, default ./{defaults.DEFAULT_STATE_DIR})")
    p.add_argument("--store", default=env("JOBMESH_STORE"), metavar="URL",
                   help="file:///path or s3://bucket/prefix (default file://DIR/store)")
    p.add_argument("--s3-endpoint", default=env("JOBMESH_S3_ENDPOINT"), metavar="URL",
                   help="an S3-compatible server instead of AWS (env JOBMESH_S3_ENDPOINT)")
    p.add_argument("--store-credentials", choices=["shared", "scoped"],
                   default=env("JOBMESH_STORE_CREDENTIALS", "shared"),
                   help="shared: sidecars use the store credentials they are given (the "
                   "default); scoped: the controller issues them IAM users that may read and "
                   "add to their own job's prefix and never delete (a user per job on "
                   "Kubernetes, one for the local agent host; env JOBMESH_STORE_CREDENTIALS)")
    p.add_argument("--iam-endpoint", default=env("JOBMESH_IAM_ENDPOINT"), metavar="URL",
                   help="the IAM API that --store-credentials scoped uses (env "
                   "JOBMESH_IAM_ENDPOINT; default AWS's, or $AWS_ENDPOINT_URL_IAM)")
    p.add_argument("--api-listen", default=env("JOBMESH_API_LISTEN", defaults.API_LISTEN),
                   metavar="HOST:PORT",
                   help=f"the HTTP API and /metrics (default {defaults.API_LISTEN})")
    p.add_argument("--api-token-file", type=Path, metavar="FILE",
                   help="the API's bearer token (default DIR/api-token, created if missing)")
    p.add_argument("--agent-key-file", type=Path, metavar="FILE",
                   default=env("JOBMESH_AGENT_KEY_FILE"),
                   help="the key each job's agent API token derives from (env "
                   "JOBMESH_AGENT_KEY_FILE; default DIR/agent-key, created if missing; "
                   "replicas on Kubernetes share one, from a Secret)")
    add_web_arguments(p)
    p.add_argument("--idle-timeout", type=float, default=defaults.IDLE_TIMEOUT, metavar="S",
                   help="pause jobs with no client for S seconds "
                   f"(default {defaults.IDLE_TIMEOUT:g}; 0: never)")
    p.add_argument("--max-running", type=int, metavar="N",
                   help="at most N jobs running; a wake beyond pauses the least recently "
                   "active idle job first")
    p.add_argument("--archive-timeout", type=int, default=defaults.ARCHIVE_TIMEOUT, metavar="S",
                   help="jobs' archive_timeout: a forced WAL segment switch "
                   f"(default {defaults.ARCHIVE_TIMEOUT}; 0: never)")
    p.add_argument("--wal-window", type=float, default=defaults.WAL_WINDOW, metavar="S",
                   help="jobs' WAL window: their agents send the streamed WAL this often, "
                   f"bounding what a lost machine loses (default {defaults.WAL_WINDOW:g}; "
                   "0: finished segments only)")
    add_job_limits(p)
    p.add_argument("--max-starting", type=int, default=defaults.MAX_STARTING, metavar="N",
                   help="job starts (create, resume, recover) run at once; more queue, and "
                   f"their clients hear their place (default {defaults.MAX_STARTING})")
    p.add_argument("--max-stopping", type=int, default=defaults.MAX_STOPPING, metavar="N",
                   help="job pauses and ends run at once (default "
                   f"{defaults.MAX_STOPPING})")
    p.add_argument("--warm-cache-bytes", type=int, default=defaults.WARM_CACHE_BYTES,
                   metavar="N",
                   help="local backend: keep paused jobs' clean PGDATA up to N bytes so a "
                   f"wake starts them in place (default {defaults.WARM_CACHE_BYTES // 2**30} "
                   "GiB; 0: always restore from the store)")
    p.add_argument("--base-backup-interval", type=float, default=defaults.BASE_BACKUP_INTERVAL,
                   metavar="S", help="a new base backup of each running job every S seconds "
                   f"(default {defaults.BASE_BACKUP_INTERVAL:g})")
    p.add_argument("--keep-pauses", type=int, default=defaults.KEEP_PAUSES, metavar="N",
                   help="pause snapshots each job keeps (default "
                   f"{defaults.KEEP_PAUSES}; a job's spec may say otherwise)")
    p.add_argument("--pitr-window", type=float, default=defaults.PITR_WINDOW, metavar="S",
                   help="base backups and WAL kept so that a point-in-time restore or fork "
                   f"can reach S seconds back (default {defaults.PITR_WINDOW:g}; per job: its "
                   "spec)")
    p.add_argument("--gc-interval", type=float, default=defaults.GC_INTERVAL, metavar="S",
                   help="collect the whole store's garbage every S seconds (default "
                   f"{defaults.GC_INTERVAL:g}; a job's own is collected after each of its pauses)")
    reconciler = ReconcilerConfig()  # its defaults are the flags' defaults
    p.add_argument("--resync-interval", type=float, default=reconciler.resync_interval,
                   metavar="S", help="look at every job every S seconds, besides the catalog's "
                   f"notifications (default {reconciler.resync_interval:g})")
    p.add_argument("--health-interval", type=float, default=reconciler.health_interval,
                   metavar="S", help="check running jobs' PostgreSQL every S seconds "
                   f"(default {reconciler.health_interval:g})")
    p.add_argument("--quiet-for", type=float, default=reconciler.quiet_for, metavar="S",
                   help="a job without sessions for S seconds may be evicted "
                   f"(default {reconciler.quiet_for:g})")
    k = p.add_argument_group("kubernetes backend")
    k.add_argument("--namespace", default=env("JOBMESH_NAMESPACE"), metavar="NS",
                   help="where job pods run (env JOBMESH_NAMESPACE; default: our own pod's)")
    k.add_argument("--image", default=env("JOBMESH_IMAGE"), metavar="IMAGE",
                   help="the jobmesh image for job pods (env JOBMESH_IMAGE)")
    k.add_argument("--kubeconfig", default=env("KUBECONFIG"), metavar="FILE",
                   help="a kubeconfig (default: in-cluster, else ~/.kube/config)")
    k.add_argument("--kube-api", metavar="URL",
                   help="the API server's URL, unauthenticated (tests)")
    k.add_argument("--router-service", default=env("JOBMESH_ROUTER_SERVICE"), metavar="HOST",
                   help="the router's host in jobs' connection URLs "
                   "(default jobmesh-router.NS.svc)")
    k.add_argument("--s3-credentials-secret", default=env("JOBMESH_S3_CREDENTIALS_SECRET"),
                   metavar="NAME", help="a Secret with AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY (optionally AWS_DEFAULT_REGION) for job pods")
    k.add_argument("--start-timeout", type=float, default=600, metavar="S",
                   help="how long a job pod may take to accept writes (default 600)")
    k.add_argument("--lease-duration", type=float, default=15, metavar="S",
                   help="leader election: the lease's duration (default 15; renewed every "
                   "third of it)")
    k.add_argument("--identity", default=env("JOBMESH_IDENTITY"), metavar="ID",
                   help="leader election: who we are (default hostname-pid)")


def add_web_arguments(p: argparse.ArgumentParser) -> None:
    """The status page's flags (shared by ``jobmesh controller`` and ``jobmesh up``)."""
    env = os.environ.get
    p.add_argument("--web-origin", action="append", metavar="URL",
                   default=[o for o in env("JOBMESH_WEB_ORIGIN", "").split(",") if o],
                   help="an address operators open the status page at besides loopback, "
                   "such as https://status.example.com behind a proxy (repeatable; env "
                   "JOBMESH_WEB_ORIGIN, comma-separated); an https one makes the session "
                   "cookie Secure")
    p.add_argument("--web-session-ttl", type=float, default=WebConfig.session_ttl,
                   metavar="S", help="a status page login lasts S seconds (default "
                   f"{WebConfig.session_ttl:g}; it also ends after "
                   f"{WebConfig.session_idle:g} s without a request)")


def web_config(args: argparse.Namespace, listen_host: str) -> WebConfig:
    if args.web_session_ttl <= 0:
        raise UsageError("--web-session-ttl must be positive")
    try:
        return WebConfig(origins=tuple(args.web_origin), listen_host=listen_host,
                         session_ttl=args.web_session_ttl,
                         session_idle=min(WebConfig.session_idle, args.web_session_ttl))
    except WebConfigError as exc:
        raise UsageError(str(exc)) from None


@dataclass
class Role:
    """Which controller this is, and who leads: a line of the status page."""

    identity: str
    elector: LeaderElector | None = None  # the Kubernetes backend's

    def __call__(self) -> str:
        if self.elector is None:
            return f"{self.identity}, running the reconciler (local backend)"
        if self.elector.leading:
            return f"{self.identity} (this replica) leads"
        holder = self.elector.holder
        return (f"{holder} leads; this replica ({self.identity}) is a candidate" if holder
                else f"no leader seen yet; this replica ({self.identity}) is a candidate")


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str
    image: str
    kubeconfig: str | None
    kube_api: str | None
    router_service: str
    s3_secret: str | None
    start_timeout: float
    lease_duration: float
    identity: str


def add_job_limits(p: argparse.ArgumentParser) -> None:
    """--job-cpu and --job-memory: the local backend's cgroup limits for a job whose spec
    sets none (shared by ``jobmesh controller`` and ``jobmesh up``)."""
    p.add_argument("--job-cpu", default=defaults.JOB_CPU, metavar="CPUS",
                   help="local backend: a job's CPU limit unless its spec sets one "
                   f"(default {defaults.JOB_CPU}; \"none\": unlimited)")
    p.add_argument("--job-memory", default=defaults.JOB_MEMORY, metavar="QUANTITY",
                   help="local backend: a job's memory limit unless its spec sets one; its "
                   f"PostgreSQL's memory settings follow it (default {defaults.JOB_MEMORY}; "
                   "\"none\": unlimited)")


def job_limits(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The flags' limits, checked (UsageError); None for "none"."""
    from .backends.local.cgroups import parse_cpu, parse_memory

    out: list[str | None] = []
    for flag, value, parse in (("--job-cpu", args.job_cpu, parse_cpu),
                               ("--job-memory", args.job_memory, parse_memory)):
        if value is None or value.lower() == "none":
            out.append(None)
            continue
        try:
            if parse(value) <= 0:
                raise ValueError(value)
        except ValueError:
            raise UsageError(f"{flag} {value!r}: expected a quantity such as "
                             f"{'0.5 or 500m' if flag == '--job-cpu' else '512Mi or 1Gi'}, "
                             "or none") from None
        out.append(value)
    return out[0], out[1]


@dataclass
class ControllerSettings:
    catalog_dsn: str
    state_dir: Path
    store: str
    s3_endpoint: str | None
    api_host: str
    api_port: int
    token_file: Path  # the API's bearer token, created (random) when the controller starts
    reconciler: ReconcilerConfig
    archive_timeout: int = defaults.ARCHIVE_TIMEOUT
    wal_window: float = defaults.WAL_WINDOW
    base_backup_interval: float = defaults.BASE_BACKUP_INTERVAL
    kubernetes: KubernetesSettings | None = None  # None: the local backend
    warm_cache_bytes: int = defaults.WARM_CACHE_BYTES  # the local backend's cache of paused PGDATA
    keep_pauses: int = defaults.KEEP_PAUSES
    pitr_window: float = defaults.PITR_WINDOW
    gc_interval: float = defaults.GC_INTERVAL
    job_cpu: str | None = defaults.JOB_CPU  # the local backend's default limits
    job_memory: str | None = defaults.JOB_MEMORY
    web: WebConfig = field(default_factory=WebConfig)  # the status page
    agent_key_file: Path | None = None  # None: DIR/agent-key
    store_access: StoreAccess | None = None  # --store-credentials scoped

    @property
    def agent_key_path(self) -> Path:
        return self.agent_key_file or self.state_dir / AGENT_KEY_FILE


def settings_from(args: argparse.Namespace) -> ControllerSettings:
    """The settings the flags ask for, checked (UsageError), with nothing created yet:
    ``serve`` makes the state directory and the token file when it starts."""
    dsn_file = args.catalog_dsn_file or (
        None if args.catalog_dsn else os.environ.get("JOBMESH_CATALOG_DSN_FILE"))
    dsn = (read_secret_file(Path(dsn_file), "--catalog-dsn-file") if dsn_file
           else args.catalog_dsn)
    if not dsn:
        raise UsageError("--catalog-dsn-file or --catalog-dsn (or JOBMESH_CATALOG_DSN) "
                         "is required")
    if args.keep_pauses < 1:
        raise UsageError("--keep-pauses must be at least 1: a paused job wakes from its newest")
    if args.pitr_window < 0 or args.gc_interval <= 0:
        raise UsageError("--pitr-window must be >= 0 and --gc-interval > 0")
    if args.max_starting < 1 or args.max_stopping < 1:
        raise UsageError("--max-starting and --max-stopping must be at least 1")
    if args.max_running is not None and args.max_running < 1:
        raise UsageError("--max-running must be at least 1")
    host, _, port = args.api_listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--api-listen {args.api_listen!r}: expected HOST:PORT")
    state = args.state_dir.absolute()
    job_cpu, job_memory = job_limits(args)
    store = args.store or f"file://{state / 'store'}"
    access = None
    if args.store_credentials not in ("shared", "scoped"):  # (from the environment)
        raise UsageError(f"--store-credentials {args.store_credentials!r}: expected shared "
                         "or scoped (env JOBMESH_STORE_CREDENTIALS)")
    if args.store_credentials == "scoped":
        try:
            access = StoreAccess(store, iam_endpoint=args.iam_endpoint)
        except AccessError as exc:
            raise UsageError(f"--store-credentials scoped: {exc}") from None
    return ControllerSettings(
        catalog_dsn=dsn, state_dir=state,
        store=store, s3_endpoint=args.s3_endpoint, store_access=access,
        api_host=host, api_port=int(port),
        token_file=args.api_token_file or state / "api-token",
        reconciler=ReconcilerConfig(
            resync_interval=args.resync_interval, health_interval=args.health_interval,
            idle_timeout=args.idle_timeout or None, max_running=args.max_running,
            quiet_for=args.quiet_for, max_starting=args.max_starting,
            max_stopping=args.max_stopping),
        archive_timeout=args.archive_timeout, base_backup_interval=args.base_backup_interval,
        wal_window=args.wal_window, warm_cache_bytes=args.warm_cache_bytes,
        keep_pauses=args.keep_pauses, pitr_window=args.pitr_window,
        gc_interval=args.gc_interval, job_cpu=job_cpu, job_memory=job_memory,
        web=web_config(args, host), agent_key_file=args.agent_key_file,
        kubernetes=kubernetes_settings(args) if args.backend == "kubernetes" else None)


def kubernetes_settings(args: argparse.Namespace) -> KubernetesSettings:
    if importlib.util.find_spec("kubernetes") is None:
        raise UsageError("--backend kubernetes needs the kubernetes client: "
                         "pip install 'jobmesh[kubernetes]'")
    from .backends.kubernetes.client import in_cluster_namespace
    from .backends.kubernetes.leader import default_identity

    namespace = args.namespace or in_cluster_namespace()
    if not namespace:
        raise UsageError("--backend kubernetes needs --namespace (or JOBMESH_NAMESPACE)")
    if not args.image:
        raise UsageError("--backend kubernetes needs --image (or JOBMESH_IMAGE): the jobmesh "
                         "image job pods run")
    if args.lease_duration < 3:
        raise UsageError("--lease-duration must be at least 3 seconds")
    return KubernetesSettings(
        namespace=namespace, image=args.image, kubeconfig=args.kubeconfig,
        kube_api=args.kube_api,
        router_service=args.router_service or f"jobmesh-router.{namespace}.svc",
        s3_secret=args.s3_credentials_secret, start_timeout=args.start_timeout,
        lease_duration=args.lease_duration, identity=args.identity or default_identity())


def make_backend(s: ControllerSettings, catalog: Catalog | None = None,
                 api: ApiClient | None = None, agent_key: bytes | None = None) -> Backend:
    if s.kubernetes is not None:
        from .backends.kubernetes.backend import KubernetesBackend
        from .backends.kubernetes.objects import PodSettings

        k = s.kubernetes
        assert catalog is not None and api is not None
        pods = PodSettings(namespace=k.namespace, image=k.image, store_url=s.store,
                           s3_endpoint=s.s3_endpoint, s3_secret=k.s3_secret,
                           archive_timeout=s.archive_timeout, wal_window=s.wal_window,
                           base_backup_interval=s.base_backup_interval)
        assert agent_key is not None
        return KubernetesBackend(api, catalog, pods, router_service=k.router_service,
                                 agent_key=agent_key, start_timeout=k.start_timeout,
                                 store_access=s.store_access)
    return local_backend(s, agent_key)


def local_backend(s: ControllerSettings, agent_key: bytes | None = None) -> LocalBackend:
    from .backends.local.backend import LocalBackend

    return LocalBackend(s.state_dir, s.store, s3_endpoint=s.s3_endpoint,
                        archive_timeout=s.archive_timeout, wal_window=s.wal_window,
                        base_backup_interval=s.base_backup_interval,
                        warm_cache_bytes=s.warm_cache_bytes, job_cpu=s.job_cpu,
                        job_memory=s.job_memory, agent_key=agent_key,
                        store_access=s.store_access)


async def serve(s: ControllerSettings, stop: asyncio.Event,
                ready: asyncio.Event | None = None) -> None:
    """Run until ``stop``: migrate the catalog, reconcile, serve the API and metrics."""
    from jobmesh.agent.postgres import postgres_gid
    from jobmesh.agent.store import StoreError, make_private, open_store

    from .api.app import build_app
    from .mesh import ensure_secret
    from .storage.keeper import Keeper
    from .storage.retention import Retention

    s.state_dir.mkdir(parents=True, exist_ok=True)
    token = ensure_secret(s.token_file)
    agent_key = ensure_secret(s.agent_key_path).encode()
    try:  # (before the catalog: the store's owner is not a thing a retry fixes)
        make_private(open_store(s.store, s3_endpoint=s.s3_endpoint), postgres_gid())
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    try:
        catalog = await Catalog.connect(s.catalog_dsn, max_size=10)
    except asyncpg.ClientConfigurationError as exc:  # a DSN no retry can fix
        raise UsageError(str(exc)) from exc
    store = open_store(s.store, s3_endpoint=s.s3_endpoint)
    runner: web.AppRunner | None = None
    try:
        await catalog.migrate()
        if s.store_access is not None:
            await ensure_key_file(store)
        metrics = ControllerMetrics()
        # Kubernetes sets a job pod's requests and limits and its volume's size; the
        # local backend puts each job in cgroups with its cpu and memory limits where it
        # can make them (never a disk limit): the API says what is not enforced when a
        # job asks for it.
        kubernetes = s.kubernetes is not None
        local = None if kubernetes else local_backend(s, agent_key)
        keeper = Keeper(store, catalog, Retention(s.keep_pauses, s.pitr_window),
                        interval=s.gc_interval)
        role = Role(s.kubernetes.identity if s.kubernetes is not None
                    else f"{socket.gethostname()}:{os.getpid()}")
        app = build_app(catalog, token=token, store=store, state_dir=s.state_dir,
                        backend="kubernetes" if kubernetes else "local",
                        enforced_limits=frozenset({"cpu", "memory", "disk"}) if local is None
                        else local.enforced_limits, keeper=keeper, web_config=s.web,
                        controller=role, agent_key=agent_key)

        async def scrape(_req: web.Request) -> web.Response:
            return web.Response(body=generate_latest(metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})
        app.router.add_get("/metrics", scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, s.api_host, s.api_port)
        await site.start()
        log.info("controller API listening on http://%s:%d (and the status page, at /)",
                 s.api_host, s.api_port)
        if ready is not None:
            ready.set()
        # Only the controller deletes from the store (sidecars only add to it), and of
        # several replicas only the leader.
        if s.kubernetes is None:
            async with keeping(keeper, stop):
                assert local is not None
                await Reconciler(catalog, local, s.reconciler, metrics).run(stop)
        else:
            await lead(s, catalog, metrics, stop, keeper, role, agent_key)
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
        await catalog.close()


@contextlib.asynccontextmanager
async def keeping(keeper: Keeper, stop: asyncio.Event) -> AsyncIterator[None]:
    """The store keeper's collections, for as long as the block runs."""
    collecting = asyncio.create_task(keeper.run(stop), name="store keeper")
    try:
        yield
    finally:
        collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collecting


async def lead(s: ControllerSettings, catalog: Catalog, metrics: ControllerMetrics,
               stop: asyncio.Event, keeper: Keeper, role: Role, agent_key: bytes) -> None:
    """Wait for the leader Lease, then reconcile while holding it; released at ``stop``."""
    from .backends.kubernetes.client import api_client
    from .backends.kubernetes.leader import LeaderElector, LeaseConfig

    k = s.kubernetes
    assert k is not None
    # Two clients: the lease's renewals never wait behind the backend's calls and watches.
    api = api_client(kube_api=k.kube_api, kubeconfig=k.kubeconfig)
    lease_api = api_client(kube_api=k.kube_api, kubeconfig=k.kubeconfig)
    try:
        backend = make_backend(s, catalog, api, agent_key)  # a bad setting fails all at once
        elector = LeaderElector(lease_api, LeaseConfig(k.namespace, k.identity,
                                                       duration=k.lease_duration))
        role.elector = elector
        log.info("candidate %s for the lease %s/%s", k.identity, k.namespace,
                 elector.config.name)
        if not await elector.acquire(stop):
            await backend.close()
            return
        done = asyncio.Event()
        holding = asyncio.create_task(elector.hold(done), name="lease")
        async with keeping(keeper, stop):
            reconciling = asyncio.create_task(
                Reconciler(catalog, backend, s.reconciler, metrics).run(stop),
                name="reconciler")
            await asyncio.wait({holding, reconciling}, return_when=asyncio.FIRST_COMPLETED)
            if holding.done():
                lost_the_lease()
            done.set()  # the reconciler stopped: let the lease go
            await holding
            await reconciling  # its error, if it failed
    finally:
        api.close()
        lease_api.close()


def lost_the_lease() -> None:
    """Another replica may take over any moment now: stop acting at once, and let the
    Deployment restart us as a candidate. (Work in flight is abandoned: the next leader
    redoes it, every backend step being idempotent.)"""
    log.critical("lost the leader lease: exiting so that the next leader takes over")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(3)


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
    except (CatalogError, BackendError) as exc:
        raise CommandFailed(str(exc)) from exc
    return 0
