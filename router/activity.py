"""Telling the catalog which jobs are in use, so idle pause leaves them alone.

The controller pauses a job nobody used for its idle timeout, judging by the
job's ``last_active``. Spliced bytes are never looked at in Python, so the
router reports sessions, not queries: every ``interval`` seconds it touches
the jobs that have at least one spliced session, and it touches a job once
more when its last session ends (the idle clock starts then, not up to an
interval earlier). A failed touch is logged and forgotten: the next one
catches up, and a job paused a little early is woken by its next client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)

Touch = Callable[[list[str]], Awaitable[None]]


class ActivityReporter:
    def __init__(self, touch: Touch, interval: float, timeout: float = 10.0) -> None:
        self._touch = touch
        self.interval = interval
        self._timeout = timeout
        self._loop_task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._failing = False

    def start(self, active: Callable[[], Iterable[str]]) -> None:
        """Report ``active()`` (job ids with spliced sessions) every interval."""
        self._loop_task = asyncio.get_running_loop().create_task(self._report(active))

    def last_session_ended(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._send([job_id]))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Stop reporting; touches already under way may finish (briefly)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._pending:
            await asyncio.wait(self._pending, timeout=self._timeout)

    async def _report(self, active: Callable[[], Iterable[str]]) -> None:
        while True:
            await asyncio.sleep(self.interval)
            job_ids = sorted(active())
            if job_ids:
                await self._send(job_ids)

    async def _send(self, job_ids: list[str]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._touch(job_ids)
        except Exception as exc:  # never fatal: the next touch catches up
            # Once per outage at WARNING, not every interval.
            log.log(logging.DEBUG if self._failing else logging.WARNING,
                    "cannot record activity of %d job(s) in the catalog: %s", len(job_ids),
                    exc or type(exc).__name__)
            self._failing = True
        else:
            if self._failing:
                log.info("recording activity in the catalog again")
            self._failing = False
