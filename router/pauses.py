"""The admin console's PAUSE and RESUME, with PgBouncer's meaning: hold a job's traffic.

``PAUSE job_x`` (or ``PAUSE`` for every job) stops handing out server
connections: a new client is held after its login (told so in a NOTICE),
and in transaction mode a client's next transaction waits; sessions already
spliced go on. The command returns once the job holds no server connection
in use (every session-mode client has left, every transaction has ended)
and its idle ones are closed, so PostgreSQL can be restarted or moved
underneath. ``RESUME`` releases everyone held. It is not the job lifecycle:
a paused job keeps running (``SNAPSHOT_STOP`` stops it, and no PgBouncer
script says that).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

ALL = "*"
POLL = 0.05  # s between looks while PAUSE waits for the job's servers to be given back


class Pauses:
    def __init__(self) -> None:
        self._held: dict[str, asyncio.Event] = {}  # job id (or ALL) -> set at RESUME

    def paused(self) -> list[str]:
        return sorted(self._held)

    def hold_for(self, job_id: str) -> asyncio.Event | None:
        """The event a client of ``job_id`` waits for, or None when nothing holds it."""
        return self._held.get(job_id) or self._held.get(ALL)

    async def pause(self, job_id: str, busy: Callable[[], int],
                    close_idle: Callable[[], None]) -> None:
        """Hold the job (or ALL), then wait until ``busy()`` (its servers in use) is 0."""
        self._held.setdefault(job_id, asyncio.Event())
        close_idle()
        while busy():
            await asyncio.sleep(POLL)
            close_idle()  # (given back meanwhile)

    def resume(self, job_id: str) -> bool:
        """Release what PAUSE held; False when it was not paused."""
        event = self._held.pop(job_id, None)
        if event is None:
            return False
        event.set()
        return True
