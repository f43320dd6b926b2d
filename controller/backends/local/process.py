"""A local job's files, and its PostgreSQL as a process.

Layout, under the backend's root::

    jobs/<id>/pgdata        PGDATA (the postgres OS user's, 0700)
    jobs/<id>/spool         where basic_archive puts finished WAL for the agent
    jobs/<id>/run           the Unix socket directory (0700: the socket trusts the superuser)
    jobs/<id>/agent.json    the agent's pid and port (and the Postgres port it serves)
    jobs/<id>/ready         the instance was fully set up (restored or copied and synced,
                            started, personalised): a crash restarts it on this data
    jobs/<id>/postgres.log, agent.log
    cache/<id>/pgdata       a paused job's PGDATA, kept warm (see ``warm_cache.py``)

Postgres is started with ``pg_ctl start`` without ``-w``: pg_ctl looks at
postmaster.pid only every 100 ms, which would be a third of a create, so we
watch the file ourselves. It is stopped by signal (as ``pg_ctl stop`` does),
waiting on a pidfd rather than on a polling tick. Neither process is our
child for long: the postmaster belongs to init once pg_ctl exits, and the
agent runs in its own session, so both outlive a controller restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobmesh.agent.postgres import bin_dir, os_user, run_pg
from jobmesh.agent.postmaster import Postmaster, read_postmaster, wait_for_exit
from jobmesh.agent.walnames import is_archivable

from ...core.backend import BackendError

log = logging.getLogger("jobmesh.controller.local")

_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
_SOCKET_NAME = ".s.PGSQL.65535"  # the longest socket name Postgres makes


@dataclass(frozen=True)
class JobDir:
    """Where one job's files live."""

    root: Path  # the backend's root
    job_id: str

    @property
    def path(self) -> Path:
        return self.root / "jobs" / self.job_id

    @property
    def pgdata(self) -> Path:
        return self.path / "pgdata"

    @property
    def spool(self) -> Path:
        return self.path / "spool"

    @property
    def run(self) -> Path:
        """The socket directory: ``run`` beside PGDATA, unless the socket path would be too
        long for a Unix socket (a long root and a long job id); then a short one under root."""
        beside = self.path / "run"
        if len(str(beside / _SOCKET_NAME)) <= _SOCKET_PATH_MAX:
            return beside
        return self.root / "run" / hashlib.sha256(self.job_id.encode()).hexdigest()[:16]

    @property
    def postgres_log(self) -> Path:
        return self.path / "postgres.log"

    @property
    def agent_log(self) -> Path:
        return self.path / "jobmesh.agent.log"

    @property
    def agent_json(self) -> Path:
        return self.path / "jobmesh.agent.json"

    @property
    def ready(self) -> Path:
        return self.path / "ready"


def prepare(jd: JobDir) -> None:
    """The job directory with its spool and socket directory, all the postgres user's
    (PGDATA itself comes from the template or a restore)."""
    if len(str(jd.run / _SOCKET_NAME)) > _SOCKET_PATH_MAX:
        raise BackendError(f"the socket path under {jd.root} is too long for a Unix socket; "
                           "use a shorter state directory")
    jd.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for d in (jd.spool, jd.run):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.chmod(0o700)
    jd.postgres_log.touch()
    user = os_user()
    if user is not None:  # these only: PGDATA may already be there, and is the user's
        entry = pwd.getpwnam(user)
        for path in (jd.path, jd.spool, jd.run, jd.postgres_log):
            os.chown(path, entry.pw_uid, entry.pw_gid)


def remove(jd: JobDir) -> None:
    """Delete the job's files: first renamed out of the way (atomically), so that a
    controller dying half-way never leaves a job directory with half a PGDATA in it."""
    trash = jd.path.with_name(f".trash-{jd.job_id}-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        jd.path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
    if jd.run != jd.path / "run":
        shutil.rmtree(jd.run, ignore_errors=True)


def empty_trash(root: Path) -> None:
    """What a removal interrupted by a crash left behind."""
    with contextlib.suppress(FileNotFoundError):
        for entry in (root / "jobs").iterdir():
            if entry.name.startswith(".trash-"):
                shutil.rmtree(entry, ignore_errors=True)


def mark_ready(jd: JobDir, how: str) -> None:
    """The marker a crash recovery trusts (``in_place.py``): written and synced after
    everything it stands for, and renamed into place, so it is whole or absent."""
    tmp = jd.ready.with_name(".ready.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"how": how, "at": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(jd.ready)
    fd = os.open(jd.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_ready(jd: JobDir) -> bool:
    return jd.ready.exists()


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_settings(jd: JobDir, port: int, archive_timeout: int) -> dict[str, str]:
    """What differs per job and per start, passed on the command line (never in the snapshot)."""
    return {
        "port": str(port),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": _list_item(str(jd.run)),
        "basic_archive.archive_directory": str(jd.spool),
        "archive_timeout": str(archive_timeout),
    }


def _list_item(path: str) -> str:
    """One entry of a comma-separated Postgres list setting, double-quoted if it needs it."""
    return f'"{path}"' if any(c in path for c in ', \t') else path


def postmaster(jd: JobDir) -> Postmaster | None:
    """The job's live postmaster, or None (no PGDATA, no pid file, or a dead pid)."""
    return read_postmaster(jd.pgdata)


def _log_since(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return ""


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _why_it_failed(text: str) -> str | None:
    """The first FATAL or PANIC line Postgres logged, without its prefix."""
    for line in text.splitlines():
        for level in ("FATAL:", "PANIC:"):
            if level in line:
                return line.split(level, 1)[1].strip()
    return None


class PortTaken(BackendError):
    """Another server bound the port picked for this start first: pick another."""


# Joins the cgroups named by its first arguments, then runs the rest: pg_ctl, whose server
# (every process of it) is then born in the job's cgroups.
_JOIN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n-1)); done; exec "$@"'


async def start_postgres(jd: JobDir, settings: Mapping[str, str], *,
                         timeout: float, join: Sequence[Path] = ()) -> Postmaster:
    """Start the job's Postgres (in the cgroups whose ``cgroup.procs`` files ``join``
    lists); returns once its postmaster.pid says ``ready`` (accepting connections;
    during archive recovery that is hot standby, not yet writable)."""
    await clear_stale_pid_file(jd)
    offset = await asyncio.to_thread(_log_size, jd.postgres_log)
    opts = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())
    argv = [str(bin_dir() / "pg_ctl"), "start", "-W", "-D", str(jd.pgdata),
            "-l", str(jd.postgres_log), "-o", opts]
    if join:
        argv = ["sh", "-c", _JOIN, "sh", str(len(join)), *map(str, join), *argv]
    proc = await asyncio.to_thread(run_pg, argv, check=False, timeout=60)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BackendError(f"pg_ctl start failed for job {jd.job_id}: "
                           f"{lines[-1] if lines else proc.returncode}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    seen = False
    while True:
        pm = postmaster(jd)  # (any pid file is this start's: stale ones were removed)
        if pm is not None:
            seen = True
            if pm.status == "ready":
                return pm
        else:
            why = _why_it_failed(await asyncio.to_thread(_log_since, jd.postgres_log, offset))
            if why == "could not create any TCP/IP sockets":
                raise PortTaken(f"PostgreSQL of job {jd.job_id} could not listen on its "
                                f"port {settings.get('port')}")
            if why or seen:
                raise BackendError(f"PostgreSQL of job {jd.job_id} did not start: "
                                   f"{why or 'it exited (see ' + str(jd.postgres_log) + ')'}")
        if loop.time() > deadline:
            raise BackendError(f"PostgreSQL of job {jd.job_id} did not accept connections "
                               f"within {timeout:g} s (see {jd.postgres_log})")
        # A small PGDATA is ready in tens of milliseconds: look often at first.
        await asyncio.sleep(0.005 if loop.time() - started < 2 else 0.05)


async def clear_stale_pid_file(jd: JobDir) -> None:
    """Remove the postmaster.pid a crash left, once nothing of that server runs.

    Postgres itself refuses to start while the pid in the file exists, and a
    crashed postmaster stays a zombie until init reaps it; we know better
    (``pid_alive`` sees zombies as dead, and no process works in PGDATA).
    """
    pid_file = jd.pgdata / "postmaster.pid"
    if not await asyncio.to_thread(pid_file.exists):
        return
    pm = postmaster(jd)
    if pm is not None and pm.pid in await asyncio.to_thread(_processes_in, jd.pgdata):
        raise BackendError(f"PostgreSQL of job {jd.job_id} is already running")
    await kill_leftovers(jd.pgdata)  # (a pid that lives on elsewhere was reused: not ours)
    await asyncio.to_thread(pid_file.unlink, True)
    await asyncio.to_thread(_remove_socket_locks, jd)


def _remove_socket_locks(jd: JobDir) -> None:
    """The dead server's socket lock files: a restart on the same port would otherwise
    refuse to start while the pid they name is a zombie or reused."""
    with contextlib.suppress(FileNotFoundError):
        for entry in jd.run.iterdir():
            if entry.name.startswith(".s.PGSQL."):
                entry.unlink(missing_ok=True)


async def stop_postgres(jd: JobDir, mode: str = "fast", *, timeout: float = 60) -> None:
    """Stop the job's Postgres (``fast``: roll back and checkpoint; ``immediate``: just go),
    then make sure no process of it is left (backends of a killed postmaster)."""
    sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
    pm = postmaster(jd)
    if pm is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pm.pid, sig)
        try:
            await wait_for_exit(pm.pid, timeout)
        except TimeoutError:
            log.warning("job %s: PostgreSQL (pid %d) ignored a %s shutdown for %g s; killing it",
                        jd.job_id, pm.pid, mode, timeout)
    await kill_leftovers(jd.pgdata)


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is ``directory`` (every Postgres process of a
    data directory works in it; a deleted one shows as '<path> (deleted)')."""
    target = os.path.realpath(directory)  # /proc shows the path with symlinks resolved
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            if cwd in (target, f"{target} (deleted)"):
                found.append(int(entry.name))
    return found


async def kill_leftovers(pgdata: Path, timeout: float = 30) -> None:
    for pid in await asyncio.to_thread(_processes_in, pgdata):
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await wait_for_exit(pid, timeout)


def cleanly_stopped(pgdata: Path) -> bool:
    """Was PGDATA shut down cleanly (a pause snapshot can be taken of it as it is)?"""
    proc = run_pg([str(bin_dir() / "pg_controldata"), "-D", str(pgdata)], check=False,
                  env={"LC_ALL": "C", "LANG": "C"})
    return proc.returncode == 0 and any(
        line.startswith("Database cluster state:") and line.endswith("shut down")
        for line in proc.stdout.splitlines())


def spool_backlog(jd: JobDir) -> int:
    """Finished WAL files waiting in the spool for the agent."""
    try:
        return sum(1 for e in os.scandir(jd.spool) if is_archivable(e.name))
    except FileNotFoundError:
        return 0
