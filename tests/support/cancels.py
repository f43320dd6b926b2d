"""Cancels for router tests: a query that waits until cancelled, and raw CancelRequests.

``waiting_victim`` holds an advisory lock on one connection and has another wait for it:
a query that ends only when released or cancelled, so a test can tell "not cancelled"
from "not cancelled yet" (the victim still waits) without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import psycopg

from tests.support.waiting import until

CANCEL_REQUEST_CODE = 80877102


def send_cancel(port: int, pid: int, secret: int, source: str = "127.0.0.1") -> None:
    """One CancelRequest (a 4-byte secret, signed as asyncpg keeps it) from ``source``;
    returns once the router has closed it (by then a cancel it forwarded reached Postgres)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        s.sendall(struct.pack("!iiIi", 16, CANCEL_REQUEST_CODE, pid, secret))
        assert s.recv(1) == b""


@dataclass
class Victim:
    pid: int
    secret: int  # its cancel key as the router issued it
    waiting: asyncio.Task[str]  # its query: ends when cancelled
    blocked: Callable[[], Awaitable[bool]]  # does it still wait for the lock?


@contextlib.asynccontextmanager
async def waiting_victim(port: int, user: str = "alice", password: str = "s3cret",
                         database: str = "job_alpha") -> AsyncIterator[Victim]:
    """A connection through the router at ``port`` waiting on a lock another one holds."""
    lock = secrets.randbelow(2**31)

    def connect() -> Awaitable[asyncpg.Connection]:
        return asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password,
                               database=database, timeout=10)

    holder = await connect()
    victim = await connect()
    try:
        await holder.execute("select pg_advisory_lock($1)", lock)
        pid = victim.get_server_pid()
        waiting = asyncio.create_task(victim.execute("select pg_advisory_lock($1)", lock))

        async def blocked() -> bool:
            return bool(await holder.fetchval(
                "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid))

        await until(blocked, "the victim to wait for the lock")
        yield Victim(pid, victim._protocol.backend_secret, waiting, blocked)
    finally:
        await holder.close()
        await victim.close()


def sleep_and_cancel(dsn: str, probe_dsn: str | None = None) -> None:
    """A pg_sleep on a connection to ``dsn``, then psycopg's cancel (to the same address,
    as libpq sends it): the sleep must end with QueryCanceled. ``probe_dsn`` (default
    ``dsn``) watches for the backend to really sleep, or the cancel would be ignored."""
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        pid = conn.info.backend_pid
        errors: list[BaseException] = []

        def sleeper() -> None:
            try:
                conn.execute("select pg_sleep(60)")
            except BaseException as exc:  # handed to the test's thread
                errors.append(exc)

        t = threading.Thread(target=sleeper)
        t.start()
        with psycopg.connect(probe_dsn or dsn, connect_timeout=10, autocommit=True) as probe:
            while t.is_alive():
                row = probe.execute("select wait_event from pg_stat_activity where pid = %s",
                                    (pid,)).fetchone()
                if row and row[0] == "PgSleep":
                    break
                t.join(0.02)
        conn.cancel_safe(timeout=10)
        t.join(30)
        assert not t.is_alive(), "the cancelled sleep went on"
        assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
