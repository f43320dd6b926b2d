"""The three peers of bench/proxy.py: one PostgreSQL 15, the jobmesh router and PgBouncer.

Each ``start_*`` function registers its own cleanup on the ExitStack it is
given, so whatever fails later (or Ctrl-C) still stops what was started.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jobmesh.agent.postgres import Instance, bin_dir, free_port, give_to_postgres, os_user

PGBOUNCER = Path("/usr/sbin/pgbouncer")
# pgbench and psql ship with the server binaries, whatever is on PATH.
os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
SUPERUSER_PASSWORD = "pw"
BENCH_USER, BENCH_PASSWORD = "bench", "bench-pw"
DATABASE = "job_bench"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support: the benches reuse the suite's harness
from tests.support.process import LoggedProcess  # noqa: E402


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message is one line for the user."""


@dataclass(frozen=True)
class Peer:
    """Where pgbench and asyncpg connect to, and as whom."""

    name: str
    port: int
    user: str
    password: str
    host: str = "127.0.0.1"
    dbname: str = DATABASE


@dataclass
class Server:
    """A proxy process we started; ``log`` holds its stderr lines (router only)."""

    peer: Peer
    proc: subprocess.Popen[str]
    logged: LoggedProcess | None = None

    @property
    def log(self) -> list[str]:
        return self.logged.log_lines() if self.logged is not None else []

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if m is None:
            raise BenchError(f"{self.peer.name}: no VmRSS for pid {self.proc.pid}")
        return int(m.group(1))


def ensure_pgbouncer() -> None:
    """Install Debian's pgbouncer if missing, without letting the package start its service."""
    if PGBOUNCER.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:  # the Debian way to say "do not start services from maintainer scripts"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "pgbouncer"]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()
                raise BenchError(f"{' '.join(cmd)} failed: {tail[-1] if tail else proc.returncode}")
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    if not PGBOUNCER.exists():
        raise BenchError(f"apt-get install pgbouncer did not provide {PGBOUNCER}")


def make_workdir(stack: contextlib.ExitStack) -> Path:
    """A temp dir the postgres OS user can enter, removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-bench-"))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    root.chmod(0o755)
    give_to_postgres(root)
    return root


def start_postgres(stack: contextlib.ExitStack, root: Path, scale: int) -> tuple[Instance, Peer]:
    inst = Instance(root / "pg", port=free_port(), settings={
        "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
        "max_connections": "1200", "shared_buffers": "128MB",
    })
    inst.initdb(superuser_password=SUPERUSER_PASSWORD)
    stack.callback(inst.stop_quietly)
    inst.start()
    inst.psql(f"CREATE DATABASE {DATABASE}")
    peer = Peer("direct", inst.port, "postgres", SUPERUSER_PASSWORD)
    run_client(["pgbench", "-i", "-q", "-s", str(scale), *conn_args(peer)], peer, timeout=600)
    return inst, peer


def conn_args(peer: Peer) -> list[str]:
    return ["-h", peer.host, "-p", str(peer.port), "-U", peer.user, peer.dbname]


def run_client(cmd: list[str], peer: Peer, timeout: float) -> str:
    """Run pgbench/psql against a peer; returns stdout, raises BenchError with stderr's tail."""
    env = {**os.environ, "PGPASSWORD": peer.password, "PGSSLMODE": "disable"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{cmd[0]} against {peer.name} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BenchError(f"{cmd[0]} against {peer.name} exited {proc.returncode}: {tail}")
    return proc.stdout


def start_router(stack: contextlib.ExitStack, root: Path, pg: Instance, *,
                 workers: int = 1, name: str = "router", pool_mode: str = "session",
                 pool_size: int | None = None) -> Server:
    routes = root / f"routes-{name}.toml"
    size = f"pool_size = {pool_size}\n" if pool_size else ""
    routes.write_text(
        f'[jobs.bench]\nhost = "127.0.0.1"\nport = {pg.port}\nuser = "postgres"\n'
        f'password = "{SUPERUSER_PASSWORD}"\npool_mode = "{pool_mode}"\n{size}\n'
        f'[users.{BENCH_USER}]\npassword = "{BENCH_PASSWORD}"\njobs = ["bench"]\n'
    )
    cmd = [sys.executable, "-m", "jobmesh", "router", "--listen", "127.0.0.1:0",
           "--routes", str(routes), "--shutdown-timeout", "5", "--workers", str(workers)]
    router = LoggedProcess(name, cmd, cwd=REPO, failure=BenchError)
    stack.callback(stop_process, router.proc, signal.SIGTERM, 15)
    m = router.wait_for_log(r"router listening on [\d.]+:(\d+)", timeout=30)
    return Server(Peer(name, int(m.group(1)), BENCH_USER, BENCH_PASSWORD), router.proc, router)


def start_pgbouncer(stack: contextlib.ExitStack, root: Path, pg: Instance, *,
                    name: str = "pgbouncer", pool_mode: str = "session",
                    pool_size: int = 1100, processes: int = 1) -> Server:
    """Our own pgbouncer (never the Debian service), foreground, as the postgres OS user;
    ``processes`` > 1 runs that many sharing the port (``so_reuseport``), PgBouncer's own
    way to use more than one core."""
    d = root / name
    d.mkdir()
    port = free_port()
    reuse = "so_reuseport = 1\n" if processes > 1 else ""
    first = _pgbouncer_process(stack, d, pg, port, pool_mode, pool_size, reuse, 0)
    for i in range(1, processes):
        other = _pgbouncer_process(stack, d, pg, port, pool_mode, pool_size, reuse, i)
        time.sleep(0.5)  # (the port answers already: make sure this one did not exit)
        if other.proc.poll() is not None:
            raise BenchError(f"pgbouncer process {i + 1} of {processes} exited "
                             f"({other.proc.returncode}): see {d / str(i)}")
    return first


def _pgbouncer_process(stack: contextlib.ExitStack, root: Path, pg: Instance, port: int,
                       pool_mode: str, pool_size: int, reuse: str, index: int) -> Server:
    d = root / str(index)
    d.mkdir()
    (d / "userlist.txt").write_text(f'"{BENCH_USER}" "{BENCH_PASSWORD}"\n')
    (d / "pgbouncer.ini").write_text(f"""\
[databases]
{DATABASE} = host=127.0.0.1 port={pg.port} dbname={DATABASE} user=postgres \
password={SUPERUSER_PASSWORD}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {d}/userlist.txt
pidfile = {d}/pgbouncer.pid
logfile = {d}/pgbouncer.log
pool_mode = {pool_mode}
max_client_conn = 1200
default_pool_size = {pool_size}
max_db_connections = 0
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = extra_float_digits
{reuse}""")
    give_to_postgres(d)
    stderr = (d / "stderr.log").open("w")
    stack.callback(stderr.close)
    proc = subprocess.Popen([str(PGBOUNCER), str(d / "pgbouncer.ini")], user=os_user(),
                            cwd=d, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    stack.callback(stop_process, proc, signal.SIGTERM, 10)  # SIGTERM: immediate shutdown
    peer = Peer(root.name, port, BENCH_USER, BENCH_PASSWORD)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return Server(peer, proc)
        time.sleep(0.1)
    log = (d / "pgbouncer.log").read_text() if (d / "pgbouncer.log").exists() else ""
    raise BenchError(f"pgbouncer did not start (exit {proc.poll()}):\n{log[-2000:]}")


def stop_process(proc: subprocess.Popen[str], sig: int, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def versions(pg: Instance) -> dict[str, str]:
    pgb = subprocess.run([str(PGBOUNCER), "--version"], capture_output=True, text=True,
                         check=False).stdout.splitlines()
    return {
        "postgres": pg.psql("SHOW server_version"),
        "pgbouncer": pgb[0] if pgb else "unknown",
        "pgbench": subprocess.run(["pgbench", "--version"], capture_output=True, text=True,
                                  check=False).stdout.strip(),
    }
