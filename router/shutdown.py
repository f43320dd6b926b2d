"""Ending sessions that outlive the shutdown timeout, cleanly.

The router never parses a spliced stream, so it cannot know where one
message ends and inject its own ErrorResponse safely. Instead it asks each
backend to end its sessions with ``pg_terminate_backend``: Postgres then
sends the client a proper FATAL 57P01 ("terminating connection due to
administrator command") at a message boundary, and closes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from .routes import JobRoute

log = logging.getLogger(__name__)


class _Terminable(Protocol):
    @property
    def job(self) -> JobRoute: ...

    @property
    def backend_pid(self) -> int: ...


@dataclass(frozen=True)
class Terminable:
    """A backend to end that is not a session's own (a transaction-mode client's, lent)."""

    job: JobRoute
    backend_pid: int


async def terminate_backends(sessions: Iterable[_Terminable], timeout: float = 5.0) -> None:
    by_route: dict[JobRoute, list[int]] = defaultdict(list)
    for s in sessions:
        by_route[s.job].append(s.backend_pid)
    for route, pids in by_route.items():
        try:
            conn = await asyncpg.connect(
                host=route.host,
                port=route.port,
                user=route.user,
                password=route.password,
                database=route.database,
                timeout=timeout,
            )
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
                    pids,
                    timeout=timeout,
                )
            finally:
                await conn.close(timeout=timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("job %s: could not terminate %d sessions: %s", route.job_id, len(pids), exc)
