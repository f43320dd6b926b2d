"""Telling the catalog which jobs are in use, so idle pause leaves them alone, and how
many clients each has, for the status page.

The controller pauses a job nobody used for its idle timeout, judging by the
job's ``last_active``. Spliced bytes are never looked at in Python, so the
router reports sessions, not queries: every ``interval`` seconds it reports its
client connections per job (the catalog touches the jobs that have any), and it
reports once more when a job's last session ends (the idle clock starts then, not
up to an interval earlier). The report is also the router's heartbeat: one row
per router process in ``router_reports``, which the status page reads, stale
after three intervals and removed when the router stops. A failed report is
logged and forgotten: the next one catches up, and a job paused a little early
is woken by its next client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

# (where this router listens, clients per job, jobs to touch besides them, how long the
# report holds)
Report = Callable[[str, dict[str, int], list[str], float], Awaitable[None]]


class ActivityReporter:
    def __init__(self, report: Report, interval: float, timeout: float = 10.0) -> None:
        self._report_to = report
        self.interval = interval
        self._timeout = timeout
        self._clients: Callable[[], Mapping[str, int]] = dict
        self._listen = ""
        self._loop_task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._failing = False

    def start(self, clients: Callable[[], Mapping[str, int]], listen: str) -> None:
        """Report ``clients()`` (client connections per job) every interval, as the
        router listening at ``listen`` (HOST:PORT)."""
        self._clients, self._listen = clients, listen
        self._loop_task = asyncio.get_running_loop().create_task(self._reporting())

    def last_session_ended(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._send([job_id]))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Stop reporting; reports already under way may finish (briefly)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._pending:
            await asyncio.wait(self._pending, timeout=self._timeout)
        if self._loop_task is not None:  # goodbye: the status page stops listing us
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await self._report_to(self._listen, {}, [], 0.0)

    async def _reporting(self) -> None:
        while True:
            await self._send([])
            await asyncio.sleep(self.interval)

    async def _send(self, touch: list[str]) -> None:
        clients = {job: n for job, n in self._clients().items() if n > 0}
        try:
            async with asyncio.timeout(self._timeout):
                await self._report_to(self._listen, clients, touch, 3 * self.interval)
        except Exception as exc:  # never fatal: the next report catches up
            # Once per outage at WARNING, not every interval.
            log.log(logging.DEBUG if self._failing else logging.WARNING,
                    "cannot report activity of %d job(s) to the catalog: %s",
                    len(clients) + len(touch), exc or type(exc).__name__)
            self._failing = True
        else:
            if self._failing:
                log.info("reporting activity to the catalog again")
            self._failing = False
