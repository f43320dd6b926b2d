"""Operating a local PostgreSQL instance: initdb, start, stop.

Postgres refuses to run as root. When the effective user is root, every
server-side binary runs as the ``postgres`` OS user (``JOBMESH_PG_OS_USER``)
and the directories it writes are handed to that user first.

This module is the agent's; the tests and the one-machine demo reuse it.
It imports nothing else of jobmesh.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shlex
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class PostgresError(RuntimeError):
    pass


def bin_dir() -> Path:
    """Where initdb, pg_ctl and postgres live (``JOBMESH_PG_BINDIR`` overrides)."""
    env = os.environ.get("JOBMESH_PG_BINDIR")
    if env:
        return Path(env)
    for candidate in ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin"):
        if Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise PostgresError("PostgreSQL server binaries not found; set JOBMESH_PG_BINDIR")


def conf_quote(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def os_user() -> str | None:
    """The OS user to run Postgres as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    return os.environ.get("JOBMESH_PG_OS_USER", "postgres")


def postgres_gid() -> int | None:
    """The group Postgres runs in when it is not ourselves (we are root): ours, since
    ``run_pg`` changes only the user (a known gap: README, "Least privilege")."""
    return None if os_user() is None else os.getegid()


def give_to_postgres(path: Path) -> None:
    """Hand a directory we created to the Postgres OS user (no-op unless root)."""
    user = os_user()
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def reachable_by_postgres(path: Path) -> bool:
    """Can the Postgres OS user walk down to ``path`` (every parent searchable by it)?

    A clone under /root (mode 0700) is not: Postgres could not open its data there.
    """
    user = os_user()
    if user is None:
        return True
    entry = pwd.getpwnam(user)
    for parent in path.absolute().parents:
        try:
            st = parent.stat()
        except OSError:
            return False
        if st.st_uid == entry.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == entry.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def run_pg(args: list[str], *, check: bool = True, timeout: float = 120,
           env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Postgres binary as the right OS user, capturing its output."""
    user = os_user()
    full_env = dict(os.environ)
    full_env.update(env or {})
    if user is not None:
        full_env["HOME"] = pwd.getpwnam(user).pw_dir
    proc = subprocess.run(
        args,
        user=user,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd="/",
        check=False,
    )
    if check and proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()
        raise PostgresError(f"{Path(args[0]).name} failed: {out[-1] if out else proc.returncode}")
    return proc


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped) does not.

    In a container whose PID 1 never reaps orphans, a crashed postmaster stays
    a zombie, and ``kill(pid, 0)`` alone would call it running.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, and not ours to signal
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where outgoing connections'
    local ports come from)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server about to start.

    Not ``bind(0)``: that hands out ports from the ephemeral range, which every
    outgoing connection on the machine draws its local port from, so a port picked
    that way is often taken again by some client before the server binds it. A random
    port below that range can only be taken by another server, and two pickers land on
    the same one about once in 20,000 picks. Callers that start a server still retry
    on a new port when its bind fails.
    """
    low, high = 10000, max(_ephemeral_low(), 10001)
    for _ in range(64):
        port = random.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Instance:
    """A PostgreSQL data directory and how to reach it once started."""

    datadir: Path
    port: int
    host: str = "127.0.0.1"
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def socket_dir(self) -> Path:
        return self.datadir

    @property
    def logfile(self) -> Path:
        return self.datadir.parent / f"{self.datadir.name}.log"

    def initdb(self, *, superuser_password: str | None = None,
               auth_host: str = "scram-sha-256") -> None:
        """Create the cluster: local socket trusts the superuser, TCP needs auth_host."""
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        give_to_postgres(self.datadir)
        args = [
            str(bin_dir() / "initdb"),
            "-D", str(self.datadir),
            "-U", "postgres",
            "--auth-local=trust",
            f"--auth-host={auth_host}",
            "--data-checksums",
            "--encoding=UTF8",
            "--locale=C",
        ]
        pwfile = None
        if superuser_password is not None:
            pwfile = self.datadir.parent / f".{self.datadir.name}.pw"
            pwfile.write_text(superuser_password)
            give_to_postgres(pwfile)
            args.append(f"--pwfile={pwfile}")
        try:
            run_pg(args)
        finally:
            if pwfile is not None:
                pwfile.unlink(missing_ok=True)

    def set_hba(self, lines: list[str]) -> None:
        (self.datadir / "pg_hba.conf").write_text("\n".join(lines) + "\n")
        give_to_postgres(self.datadir / "pg_hba.conf")

    def start(self, timeout: int = 60) -> None:
        opts = {
            "port": str(self.port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }
        o = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in opts.items())
        self.logfile.touch()
        give_to_postgres(self.logfile)
        run_pg([
            str(bin_dir() / "pg_ctl"), "start", "-D", str(self.datadir), "-w",
            "-t", str(timeout), "-l", str(self.logfile), "-o", o,
        ], timeout=timeout + 10)

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        run_pg([str(bin_dir() / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", mode,
                "-w", "-t", str(timeout)], timeout=timeout + 10)

    def reload(self) -> None:
        run_pg([str(bin_dir() / "pg_ctl"), "reload", "-D", str(self.datadir)])

    def is_running(self) -> bool:
        proc = run_pg([str(bin_dir() / "pg_ctl"), "status", "-D", str(self.datadir)], check=False)
        return proc.returncode == 0

    def stop_quietly(self) -> None:
        with contextlib.suppress(PostgresError, subprocess.TimeoutExpired):
            if self.is_running():
                self.stop("immediate")

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run SQL as the superuser over the Unix socket; returns unaligned output."""
        proc = run_pg([
            str(bin_dir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
            "-d", database, "-c", sql,
        ])
        return proc.stdout.strip()
