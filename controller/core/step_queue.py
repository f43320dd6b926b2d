"""At most N reconciler steps of one kind at once, first come first served.

A storm of wakes (or of evictions) that all ran at once would starve every
one of CPU; queued, they finish in turn, and each waiting job is told its
place, which the router passes on to a waking client as a notice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .backend import Progress


class StepQueue:
    """At most ``limit`` steps of one kind at once, first come first served; the waiting
    ones are told their place (the router passes it on to a waking client)."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = max(1, limit)
        self.running = 0
        self.waiting: list[str] = []
        self._turn = asyncio.Condition()
        self._telling: set[asyncio.Future[None]] = set()

    @contextlib.asynccontextmanager
    async def turn(self, job_id: str, progress: Progress) -> AsyncIterator[None]:
        async with self._turn:
            if self.running >= self.limit or self.waiting:
                self.waiting.append(job_id)
                try:
                    told = -1
                    while self.running >= self.limit or self.waiting[0] != job_id:
                        place = self.waiting.index(job_id) + 1
                        if place != told:
                            told = place
                            told_task = asyncio.ensure_future(progress(
                                f"queued: {_ordinal(place)} of {len(self.waiting)} waiting to "
                                f"{self.kind} ({self.limit} at a time)"))
                            self._telling.add(told_task)
                            told_task.add_done_callback(self._telling.discard)
                        await self._turn.wait()
                finally:
                    self.waiting.remove(job_id)
                    self._turn.notify_all()
            self.running += 1
        try:
            yield
        finally:
            async with self._turn:
                self.running -= 1
                self._turn.notify_all()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
