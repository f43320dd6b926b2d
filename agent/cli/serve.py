"""``agent serve``: the sidecar's flags (the daemon is ``jobmesh.agent.sidecar``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from jobmesh.defaults import (
    BASE_BACKUP_INTERVAL,
    BASE_BACKUP_WAL_BYTES,
    KEEP_BASE_BACKUPS,
    WAL_WINDOW,
)

from ..errors import AgentError
from ..fence import FENCE_INTERVAL
from . import add_store_arguments

if TYPE_CHECKING:
    from . import Subparsers


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="run beside a job's PostgreSQL: WAL, backups, HTTP API",
                       description="Ship WAL continuously, take scheduled base backups and "
                                   "serve /healthz, /status, /metrics, POST /pause, "
                                   "/base-backup and /dump.")
    p.add_argument("--pgdata", required=True, type=Path, metavar="DIR",
                   help="the job's PGDATA")
    add_store_arguments(p)
    p.add_argument("--listen", default="127.0.0.1:8008", metavar="HOST:PORT",
                   help="HTTP address (default 127.0.0.1:8008; port 0 picks a free one)")
    p.add_argument("--spool", type=Path, metavar="DIR",
                   help="where Postgres archives WAL (default: <PGDATA>.spool)")
    p.add_argument("--base-backup-interval", type=float, default=BASE_BACKUP_INTERVAL,
                   metavar="S", help=f"seconds between base backups "
                                     f"(default {BASE_BACKUP_INTERVAL:g}; 0: no scheduled "
                                     f"base backups at all)")
    p.add_argument("--base-backup-wal-bytes", type=int, default=BASE_BACKUP_WAL_BYTES,
                   metavar="N", help=f"also a base backup after N bytes of WAL since the last "
                                     f"one (default {BASE_BACKUP_WAL_BYTES} = "
                                     f"{BASE_BACKUP_WAL_BYTES / 2**20:g} MiB; 0: no such rule)")
    p.add_argument("--wal-window", type=float, default=WAL_WINDOW, metavar="S",
                   help=f"stream WAL and upload what arrived every S seconds: a lost machine "
                        f"loses at most that plus the upload (default {WAL_WINDOW:g}; "
                        f"0: no streaming, only finished segments)")
    p.add_argument("--dsn", help="postgresql:// URI for base backups, dumps and status "
                                 "(default: the local socket as postgres)")
    p.add_argument("--generation", type=int, default=0, metavar="N",
                   help="this incarnation's generation, from the catalog: claimed in the "
                        "store; a newer claim stops this agent and its PostgreSQL "
                        "(default 0: unfenced)")
    p.add_argument("--fence-interval", type=float, default=FENCE_INTERVAL, metavar="S",
                   help=f"while uploading WAL, look for a newer claim at most every S seconds "
                        f"(manifests and deletes look every time; default {FENCE_INTERVAL:g})")
    p.add_argument("--keep-base-backups", type=int, default=KEEP_BASE_BACKUPS, metavar="N",
                   help=f"after each base backup, keep the newest N and the WAL they need "
                        f"(default {KEEP_BASE_BACKUPS}; 0: delete nothing, for a controller "
                        f"that applies its own retention)")
    p.add_argument("--stop-timeout", type=float, default=300, metavar="S",
                   help="how long a pause waits for PostgreSQL to stop (default 300)")
    add_token_arguments(p, "the API")
    p.set_defaults(run=run_serve)


def add_token_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--api-token-file", type=Path, metavar="FILE",
                   help=f"the bearer token {what} asks for (else $JOBMESH_AGENT_TOKEN); the "
                        "controller makes one per job")
    p.add_argument("--no-api-token", action="store_true",
                   help=f"serve {what} to anyone who reaches it (by hand, on a machine of "
                        "your own)")


def api_token(args: argparse.Namespace) -> str | None:
    """The token the flags give (None: --no-api-token); AgentError when there is none."""
    from ..apitoken import TOKEN_ENV, read_token

    if args.no_api_token:
        return None
    try:
        token = read_token(args.api_token_file)
    except (OSError, ValueError) as exc:
        raise AgentError(f"--api-token-file: {exc}") from exc
    if token is None:
        raise AgentError(f"the API needs a token: --api-token-file FILE or ${TOKEN_ENV} "
                         "(--no-api-token serves it to anyone who reaches it)")
    return token


def add_host(sub: Subparsers) -> None:
    p = sub.add_parser("host", help="be the agent of every job on this machine (local backend)",
                       description="One process that runs the agent of each local job: "
                                   "PUT /jobs/ID starts one, DELETE /jobs/ID stops it, and a "
                                   "job's API is serve's under /jobs/ID.")
    p.add_argument("--store", required=True, metavar="URL",
                   help="file:///abs/path or s3://bucket/prefix")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="S3 API endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="HTTP address (default 127.0.0.1:0: a free port)")
    p.add_argument("--state", type=Path, metavar="FILE",
                   help="write {pid, port} here once listening")
    add_token_arguments(p, "the host's own endpoints (PUT, DELETE, GET /jobs)")
    p.set_defaults(run=run_host)


def lean_malloc() -> None:
    """Make glibc give freed memory back: a long-lived agent's uploads allocate chunk and
    segment buffers (1 to 16 MiB) that, once glibc's dynamic mmap threshold has grown
    past them, stay in the heap after they are freed (an agent host with six idle jobs:
    80 MB PSS, 40 MB with this). Fixed mmap threshold; two malloc arenas at most."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also ends its dynamic growth)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc: its own allocator's ways


def raise_fd_limit() -> None:
    """The soft limit on open files up to the hard one: the agent host holds a few per
    running job (pg_receivewal's pipes and pidfd, store files), and soft limits are often
    1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def run_host(args: argparse.Namespace) -> int:
    from ..postgres import postgres_gid
    from ..sidecar.host import serve_host
    from ..store import make_private, open_store

    lean_malloc()
    raise_fd_limit()
    address = parse_listen(args.listen)
    token = api_token(args)
    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    make_private(store, postgres_gid())
    return asyncio.run(serve_host(store, address, args.state and args.state.absolute(),
                                  token))


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise AgentError(f"--listen: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_serve(args: argparse.Namespace) -> int:
    from ..postgres import postgres_gid
    from ..sidecar.daemon import ServeConfig
    from ..sidecar.serve import serve
    from ..store import make_private, open_store

    host, port = parse_listen(args.listen)
    pgdata = args.pgdata.absolute()
    if not (pgdata / "PG_VERSION").is_file():
        raise AgentError(f"{pgdata} is not a PostgreSQL data directory")
    if args.base_backup_interval < 0:
        raise AgentError("--base-backup-interval must be >= 0")
    if args.base_backup_wal_bytes < 0:
        raise AgentError("--base-backup-wal-bytes must be >= 0")
    if args.wal_window < 0:
        raise AgentError("--wal-window must be >= 0")
    if args.generation < 0:
        raise AgentError("--generation must be >= 0")
    if args.fence_interval < 0:
        raise AgentError("--fence-interval must be >= 0")
    spool = (args.spool or pgdata.with_name(pgdata.name + ".spool")).absolute()
    config = ServeConfig(pgdata, args.job, spool, args.base_backup_interval, args.dsn,
                         args.stop_timeout, wal_window=args.wal_window,
                         base_backup_wal_bytes=args.base_backup_wal_bytes,
                         generation=args.generation, fence_interval=args.fence_interval,
                         keep_base_backups=max(0, args.keep_base_backups),
                         api_token=api_token(args))
    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    make_private(store, postgres_gid())
    lean_malloc()
    return asyncio.run(serve(config, store, host, port))


PARSERS = {"serve": add_serve, "host": add_host}
