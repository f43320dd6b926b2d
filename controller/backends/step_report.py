"""Long backend steps told as they go: timings for the log and events, progress for waiters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from jobmesh.agent.progress import Progress as ProgressBar

log = logging.getLogger("jobmesh.controller")

Report = Callable[[str], Awaitable[None]]


class Laps:
    """Milliseconds per step, for the log and the event's detail."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = round((now - self._last) * 1000, 1)
        self._last = now

    def total(self) -> float:
        return (self._last - self._start) * 1000

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.0f} ms" for k, v in self.laps.items())


class Relay(ProgressBar):
    """An agent progress bar (restore, snapshot) retold through a backend's progress
    callback: at most once a second, one message in flight, failures only logged."""

    def __init__(self, send: Report, what: str, total: int) -> None:
        super().__init__(what, total, enabled=False)
        self._send = send
        self._last = time.monotonic()
        self._pending: asyncio.Task[None] | None = None

    def advance(self, n: int) -> None:
        super().advance(n)
        now = time.monotonic()
        if now - self._last >= 1.0 and (self._pending is None or self._pending.done()):
            self._last = now
            text = f"{self.label} {mb(self.done)} of {mb(self.total or 0)}"
            self._pending = asyncio.get_running_loop().create_task(self._quietly(text))

    async def _quietly(self, text: str) -> None:
        try:
            await self._send(text)
        except Exception as exc:
            log.warning("cannot report progress: %s", exc)

    async def flush(self) -> None:
        if self._pending is not None:
            await self._pending


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
