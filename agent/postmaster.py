"""A running PostgreSQL seen from outside: its ``postmaster.pid``, its exit, its readiness.

The sidecar and the controller's local backend both watch postmasters they
did not start, so this lives in the agent's library half.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from .postgres import bin_dir, pid_alive

POLL = 0.05  # when a pidfd is not available, how often to look at the postmaster



@dataclass(frozen=True)
class Postmaster:
    """What ``postmaster.pid`` says about a running server."""

    pid: int
    port: int
    socket_dir: str
    listen: str
    status: str  # "starting", "ready", "stopping", "standby" (PostgreSQL 10+)

    def default_dsn(self) -> str:
        """The local socket as the postgres superuser, as a URI (asyncpg and libpq read it)."""
        host = self.socket_dir or (self.listen.split(",")[0].strip().replace("*", "127.0.0.1")
                                   or "127.0.0.1")
        return f"postgresql://postgres@/postgres?host={quote(host, safe='')}&port={self.port}"


def with_database(dsn: str, database: str) -> str:
    """The same connection string, naming another database."""
    if dsn.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path="/" + quote(database, safe="")))
    quoted = database.replace("\\", "\\\\").replace("'", "\\'")
    return f"{dsn} dbname='{quoted}'"  # libpq: the last keyword wins


def read_postmaster(pgdata: Path) -> Postmaster | None:
    """The live postmaster of ``pgdata``, or None when there is none."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().split("\n")
        pid = int(lines[0])
        pm = Postmaster(pid, int(lines[3]), lines[4].strip(), lines[5].strip() if len(lines) > 5
                        else "", lines[7].strip() if len(lines) > 7 else "")
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pm if pid_alive(pid) else None  # else a stale file, left by a crash


async def wait_for_exit(pid: int, timeout: float) -> None:
    """Return once process ``pid`` (not our child) has exited; TimeoutError after timeout.

    A pidfd becomes readable when the process is gone, so this wakes at once
    rather than on a polling tick; without pidfds we look every 50 ms.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):
        fd = None
    loop = asyncio.get_running_loop()
    if fd is not None:
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(gone, timeout)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return
    deadline = loop.time() + timeout
    while pid_alive(pid):
        if loop.time() > deadline:
            raise TimeoutError
        await asyncio.sleep(POLL)


async def pg_isready(dsn: str, timeout: int = 3) -> bool:
    """Whether the server accepts connections (auth is not attempted, as pg_isready)."""
    proc = await asyncio.create_subprocess_exec(
        str(bin_dir() / "pg_isready"), "-q", "-t", str(timeout), "-d", dsn,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(proc.wait(), timeout + 2) == 0
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
