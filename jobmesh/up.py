"""``jobmesh up``: the whole mesh on one machine, under one state directory.

It starts (creating on first use) a catalog PostgreSQL, the controller with
the local backend and its HTTP API, a ``file://`` store, and the router on
``--port``; makes an admin principal with a generated password (stored in the
state directory and shown once); and prints how to connect. Ctrl-C pauses
every running job cleanly (its snapshot is in the store) and stops the rest;
the next ``up`` continues where it stopped, and a connect wakes any job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from jobmesh import defaults, jobids
from jobmesh.agent.postgres import (
    Instance,
    PostgresError,
    free_port,
    give_to_postgres,
    pid_alive,
    reachable_by_postgres,
)
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import CatalogError
from jobmesh.controller.catalog.passwords import scram_verifier
from jobmesh.controller.catalog.states import ACTIVE, DesiredState
from jobmesh.controller.core.reconciler import ReconcilerConfig
from jobmesh.controller.main import (
    ControllerSettings,
    add_job_limits,
    add_web_arguments,
    job_limits,
    serve,
    web_config,
)
from jobmesh.controller.mesh import ensure_secret, write_mesh
from jobmesh.errors import CommandFailed, UsageError
from jobmesh.secretfile import write_secret_file

log = logging.getLogger("jobmesh.up")
ADMIN = "admin"
ROUTER_ROLE = "jobmesh_router"  # the routers' catalog role (migration 0008)
API_PORT = int(defaults.API_LISTEN.rsplit(":", 1)[1])  # where the status page is, if free
CATALOG_DB = "jobmesh"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=defaults.state_dir(), metavar="DIR",
                   help=f"everything lives here (env {defaults.STATE_DIR_ENV}, "
                   f"default ./{defaults.DEFAULT_STATE_DIR})")
    p.add_argument("--port", type=int, default=defaults.ROUTER_PORT,
                   help=f"the router's port (default {defaults.ROUTER_PORT})")
    p.add_argument("--api-port", type=int, default=0,
                   help="the controller's API and status page port (default "
                   f"{API_PORT}, or any free port when that one is taken)")
    p.add_argument("--demo-job", metavar="ID", help="create this job if it does not exist")
    p.add_argument("--idle-timeout", type=float, default=defaults.IDLE_TIMEOUT, metavar="S",
                   help="pause jobs with no client for S seconds "
                   f"(default {defaults.IDLE_TIMEOUT:g}; 0: never)")
    p.add_argument("--max-running", type=int, metavar="N", help="at most N jobs running")
    add_job_limits(p)
    add_web_arguments(p)
    p.add_argument("--archive-timeout", type=int, default=defaults.ARCHIVE_TIMEOUT, metavar="S",
                   help="archive a job's WAL at least every S seconds: what a lost machine "
                   f"may lose at most (default {defaults.ARCHIVE_TIMEOUT})")
    p.add_argument("--wake-timeout", type=float, default=defaults.WAKE_TIMEOUT, metavar="S",
                   help="how long a client waits for its paused job to wake "
                   f"(default {defaults.WAKE_TIMEOUT:g})")


def run(args: argparse.Namespace) -> int:
    import uvloop

    if args.demo_job is not None and not jobids.is_job_id(args.demo_job):
        raise UsageError(f"--demo-job: {jobids.message(args.demo_job)}")

    state = args.state_dir.absolute()
    job_limits(args)  # (checked before anything starts)
    web_config(args, "127.0.0.1")
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandFailed(f"cannot create the state directory {state}: {exc.strerror}") from exc
    state.chmod(0o755)  # the postgres OS user must reach the job and catalog directories
    lock = lock_state_dir(state)
    try:
        data = data_root(state)
        return uvloop.run(_up(args, state, data))
    except CatalogError as exc:
        raise CommandFailed(str(exc)) from exc
    finally:
        os.close(lock)


def lock_state_dir(state: Path) -> int:
    """Hold ``DIR/jobmesh.lock`` (an exclusive ``flock``) for as long as this mesh runs;
    a second ``up`` on the same directory fails at once, naming the first one's pid.

    A lock, not a pid file: the kernel releases it when the process dies however it dies,
    so it never goes stale, and a reused pid cannot fake it. The descriptor is not
    inherited by what ``up`` starts (Python's default), so a router or PostgreSQL left
    behind by a killed ``up`` does not keep the directory locked.
    """
    path = state / "jobmesh.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CommandFailed(f"cannot open {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CommandFailed(f"{state} is in use by another `jobmesh up` (pid {holder}); "
                            "stop it first (Ctrl-C there) or use another --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def data_root(state: Path) -> Path:
    """Where PostgreSQL data lives: the state directory, unless the Postgres OS user cannot
    reach it (a clone under /root). Then a directory under /var/lib/jobmesh, linked from
    the state directory as ``data``, so everything is still found from there."""
    if reachable_by_postgres(state / "x"):
        return state
    digest = hashlib.sha256(str(state).encode()).hexdigest()[:12]
    data = Path("/var/lib/jobmesh") / f"{state.parent.name}-{digest}"
    data.mkdir(parents=True, exist_ok=True)
    for p in (data.parent, data):
        p.chmod(0o755)
    link = state / "data"
    if not link.is_symlink():
        link.symlink_to(data)
    log.info("the postgres user cannot reach %s: PostgreSQL data is in %s", state, data)
    return data


async def _up(args: argparse.Namespace, state: Path, data: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    catalog_pg = await asyncio.to_thread(_start_catalog, state, data)
    router: subprocess.Popen[bytes] | None = None
    controller: asyncio.Task[None] | None = None
    controller_stop = asyncio.Event()
    try:
        dsn = (f"postgresql://postgres:{ensure_secret(state / 'catalog-password')}"
               f"@127.0.0.1:{catalog_pg.port}/{CATALOG_DB}")
        api_port = args.api_port or (API_PORT if port_is_free(API_PORT) else free_port())
        job_cpu, job_memory = job_limits(args)
        settings = ControllerSettings(
            catalog_dsn=dsn, state_dir=data, store=f"file://{data / 'store'}",
            s3_endpoint=None, api_host="127.0.0.1", api_port=api_port,
            token_file=state / "api-token",
            reconciler=ReconcilerConfig(idle_timeout=args.idle_timeout or None,
                                        max_running=args.max_running),
            archive_timeout=args.archive_timeout, job_cpu=job_cpu, job_memory=job_memory,
            web=web_config(args, "127.0.0.1"))
        ready = asyncio.Event()
        controller = asyncio.create_task(serve(settings, controller_stop, ready))
        await _first(ready.wait(), controller)
        catalog = await Catalog.connect(dsn)
        try:
            shown = await _ensure_admin(catalog, state)
            if args.demo_job and await catalog.job(args.demo_job) is None:
                await catalog.create_job(args.demo_job, {})
            router_dsn = await _router_login(catalog, state, dsn)
            router = await asyncio.to_thread(_start_router, state, router_dsn, args)
            write_mesh(state, f"http://127.0.0.1:{api_port}", "127.0.0.1", args.port, ADMIN)
            _greet(state, args, shown, api_port)
            await _first(stop.wait(), controller)
            print("\npausing running jobs ...", flush=True)
            await _pause_all(catalog, controller)
        finally:
            await catalog.close()
    finally:
        if router is not None:
            router.send_signal(signal.SIGTERM)
            await asyncio.to_thread(_wait, router, 15)
        controller_stop.set()
        if controller is not None:
            with contextlib.suppress(Exception):
                await controller
        await asyncio.to_thread(_stop_catalog, catalog_pg)
    print("jobmesh stopped; `jobmesh up` continues where it left off.", flush=True)
    return 0


async def _first(aw: Awaitable[object], controller: asyncio.Task[None]) -> None:
    """Wait for ``aw``, but fail at once if the controller task ends first (its error)."""
    waiter = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({waiter, controller}, return_when=asyncio.FIRST_COMPLETED)
    if controller in done:
        waiter.cancel()
        controller.result()  # raises the controller's error
        raise CommandFailed("the controller stopped unexpectedly")


def _stop_catalog(inst: Instance) -> None:
    """A fast (clean) shutdown; the catalog must not need crash recovery next time."""
    with contextlib.suppress(PostgresError, subprocess.TimeoutExpired):
        if inst.is_running():
            inst.stop("fast")


def _start_catalog(state: Path, data: Path) -> Instance:
    """The catalog's own PostgreSQL under DIR/catalog, created on first use."""
    home = data / "catalog"
    home.mkdir(exist_ok=True)
    home.chmod(0o755)
    give_to_postgres(home)
    password = ensure_secret(state / "catalog-password")
    inst = Instance(home / "pgdata", port=free_port())
    pidfile = inst.datadir / "postmaster.pid"
    try:
        if not (inst.datadir / "PG_VERSION").exists():
            print(f"creating the catalog PostgreSQL in {inst.datadir} ...", flush=True)
            inst.initdb(superuser_password=password)
        elif pidfile.exists():  # a previous `up` was killed: take its catalog back
            lines = pidfile.read_text().splitlines()
            if lines and lines[0].isdigit() and pid_alive(int(lines[0])):
                inst.stop("fast")
        inst.start()
        if inst.psql(f"SELECT 1 FROM pg_database WHERE datname = '{CATALOG_DB}'") != "1":
            inst.psql(f"CREATE DATABASE {CATALOG_DB}")
    except PostgresError as exc:
        raise CommandFailed(f"cannot start the catalog PostgreSQL in {inst.datadir}: "
                            f"{exc}") from exc
    return inst


async def _router_login(catalog: Catalog, state: Path, dsn: str) -> str:
    """The router's catalog DSN: the routers' role (migration 0008: it reads routes and
    may only wake, pause and report), with a password made once and kept."""
    password = ensure_secret(state / "router-catalog-password")
    await catalog.pool.execute(f"ALTER ROLE {ROUTER_ROLE} LOGIN PASSWORD "
                               f"'{password.replace(chr(39), chr(39) * 2)}'")
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(
        netloc=f"{ROUTER_ROLE}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"))


async def _ensure_admin(catalog: Catalog, state: Path) -> bool:
    """The admin principal (write on every job); True when it was created just now."""
    path = state / "admin-password"
    fresh = not path.exists()
    password = ensure_secret(path)
    if await catalog.principals(ADMIN):
        if fresh:  # the password file was removed: the new one replaces the old
            await catalog.set_verifier(ADMIN, scram_verifier(password))
        return fresh
    await catalog.create_principal(ADMIN, scram_verifier(password), admin=True)
    return True


def _start_router(state: Path, dsn: str, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    pidfile = state / "jobmesh.router.pid"
    with contextlib.suppress(OSError, ValueError):
        old = int(pidfile.read_text())
        if pid_alive(old) and b"jobmesh" in Path(f"/proc/{old}/cmdline").read_bytes():
            os.kill(old, signal.SIGTERM)  # left by an `up` that was killed
    log_path = state / "jobmesh.router.log"
    log_path.touch()
    dsn_file = write_secret_file(state / "router-catalog-dsn", dsn)  # never in argv
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobmesh", "router", "--catalog-dsn-file", str(dsn_file),
         "--listen", f"127.0.0.1:{args.port}", "--wake-timeout", str(args.wake_timeout)],
        stdout=subprocess.DEVNULL, stderr=log_path.open("ab"), start_new_session=True)
    pidfile.write_text(str(proc.pid))
    if not _wait_for_log(log_path, proc, "router listening on"):
        raise CommandFailed(f"the router did not start; see {log_path}")
    return proc


def _wait_for_log(path: Path, proc: subprocess.Popen[bytes], text: str,
                  timeout: float = 30) -> bool:
    """Poll the router's log for its ready line (it is a separate process; runs in a
    thread, so the controller's loop goes on meanwhile)."""
    start = path.stat().st_size
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with path.open("rb") as f:
            f.seek(start)
            if text.encode() in f.read():
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


async def _pause_all(catalog: Catalog, controller: asyncio.Task[None],
                     timeout: float = 600) -> None:
    for job in await catalog.jobs():
        if job.desired_state == DesiredState.RUNNING:
            await catalog.set_desired(job.id, DesiredState.PAUSED)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not controller.done():
        busy = [j.id for j in await catalog.jobs() if j.state in ACTIVE]
        if not busy:
            return
        await asyncio.sleep(0.2)
    log.warning("gave up waiting for jobs to pause")


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` now (a guess: it may be taken next)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cli_name() -> str:
    """How to call this jobmesh from the user's shell: ``jobmesh`` when that is the one on
    PATH, else its path (``.venv/bin/jobmesh`` after ``make up``)."""
    me = Path(sys.argv[0])
    if me.name != "jobmesh":
        me = Path(sys.executable).parent / "jobmesh"
    on_path = shutil.which("jobmesh")
    if on_path and Path(on_path).resolve() == me.resolve():
        return "jobmesh"
    with contextlib.suppress(ValueError):
        return str(me.absolute().relative_to(Path.cwd()))
    return str(me.absolute())


def _greet(state: Path, args: argparse.Namespace, shown: bool, api_port: int) -> None:
    password = (state / "admin-password").read_text().strip()
    job = args.demo_job or "<id>"
    lines = ["", f"jobmesh is up (state in {state}).", ""]
    if shown:
        lines += [f"admin password (shown once, kept in {state / 'admin-password'}):",
                  f"  {password}", ""]
    lines += [
        "Connect:",
        f'  psql "postgresql://{ADMIN}:{password if shown else "<admin-password>"}'
        f'@127.0.0.1:{args.port}/job_{job}"',
        f"  {cli_name()} psql {job}",
        "",
        f"Status page: http://127.0.0.1:{api_port}/ (log in as {ADMIN})",
        "",
        "Ctrl-C pauses running jobs (snapshots in the store) and stops; "
        "the next `jobmesh up` continues.",
    ]
    print("\n".join(lines), flush=True)
