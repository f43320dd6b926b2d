"""Waking a paused job for the clients that want it: one wake per job, many waiters.

The first client for a job that is not running starts a wake: the router
asks the catalog for it once (``request_wake`` only changes a job wanted
paused, so however many routers ask there is one wake-requested event) and
then follows the job's catalog row, which the route cache keeps fresh from
``NOTIFY``. Every later client of that job joins the same wake. Each waiting
client hears "waking job_<id>" when it joins and every new ``progress``
text of the row as a NoticeResponse, and waits at most ``timeout`` seconds
from its own arrival.

A wake ends when the row says the job runs at an address (the clients go
on to log in), or when it will not come up: the job is wanted ended or
deleted, its row is gone, the controller gave up on starting it (``gave_up``:
a failure retrying cannot fix), or its last ``MAX_ATTEMPTS`` attempts failed
(``error`` set and ``attempts >= MAX_ATTEMPTS``): then every waiter gets the
same 57P03 at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from jobmesh.controller.catalog.models import Job
from jobmesh.controller.catalog.states import DesiredState, JobState

from . import errors
from .errors import ClientError
from .metrics import RouterMetrics
from .route_source import Notice

log = logging.getLogger(__name__)

# Waiters give up once the controller's attempts at starting the job failed this often.
MAX_ATTEMPTS = 3


def assess(job_id: str, job: Job | None) -> bool:
    """True when the job runs at an address, False while it may still come up.

    Raises the ClientError for the client when it will not come up.
    """
    if job is None:
        raise errors.unknown_job(job_id)
    if (job.desired_state in (DesiredState.ENDED, DesiredState.DELETED)
            or job.state == JobState.DELETING):
        raise errors.job_ended(job_id, DesiredState.DELETED if job.state == JobState.DELETING
                               else job.desired_state)
    if job.state == JobState.RUNNING and job.host and job.port:
        return True
    # Wanted paused, a wake's request clears the mark and the controller tries again.
    if job.gave_up and job.error and job.desired_state == DesiredState.RUNNING:
        raise errors.wake_gave_up(job_id, job.error)
    if job.error and job.attempts >= MAX_ATTEMPTS:
        raise errors.wake_failed(job_id, job.error, job.attempts)
    return False


@dataclass(eq=False)
class _Wake:
    job_id: str
    done: asyncio.Future[Job]
    progress: str | None
    notices: set[Notice] = field(default_factory=set)

    def tell(self, text: str) -> None:
        for notice in list(self.notices):
            notice(text)


class Wakes:
    """The wakes in flight in this router, by job id."""

    def __init__(
        self,
        request: Callable[[str], Awaitable[Job | None]],
        metrics: RouterMetrics,
        timeout: float,
    ) -> None:
        self._request_wake = request  # raises ClientError when the catalog cannot be asked
        self._metrics = metrics
        self._timeout = timeout
        self._wakes: dict[str, _Wake] = {}
        self._requests: set[asyncio.Task[None]] = set()  # outlive their wake if all waiters left

    def job_ids(self) -> list[str]:
        """Jobs with a wake under way."""
        return [job_id for job_id, wake in self._wakes.items() if not wake.done.done()]

    async def until_running(self, job: Job, notice: Notice) -> Job:
        """The job's row once it runs; wakes it first (or joins the wake under way)."""
        if assess(job.id, job):
            return job
        wake = self._wakes.get(job.id)
        if wake is not None and wake.done.done() and wake.done.exception() is None:
            return wake.done.result()
        if wake is None or wake.done.done():
            wake = self._begin(job)
        loop = asyncio.get_running_loop()
        started = loop.time()
        wake.notices.add(notice)
        self._metrics.clients_waiting.inc()
        notice(f"waking {job.database}")
        if wake.progress:
            notice(f"waking {job.database}: {wake.progress}")
        try:
            async with asyncio.timeout(self._timeout):
                row = await asyncio.shield(wake.done)
        except TimeoutError:
            raise errors.wake_timeout(job.id, self._timeout, wake.progress) from None
        finally:
            wake.notices.discard(notice)
            self._metrics.clients_waiting.dec()
            if not wake.notices and self._wakes.get(job.id) is wake:
                del self._wakes[job.id]
        self._metrics.wake_wait.observe(loop.time() - started)
        return row

    def changed(self, job_id: str, job: Job | None) -> None:
        """The cache has a newer row for ``job_id`` (None: the row is gone)."""
        wake = self._wakes.get(job_id)
        if wake is None or wake.done.done():
            return
        if job is not None and job.progress != wake.progress:
            wake.progress = job.progress
            if job.progress:
                wake.tell(f"waking {job.database}: {job.progress}")
        self._judge(wake, job)

    def _begin(self, job: Job) -> _Wake:
        loop = asyncio.get_running_loop()
        wake = _Wake(job.id, loop.create_future(), job.progress)
        # Waiters may all have left (timeout, hang-up) before a failure is known.
        wake.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._wakes[job.id] = wake
        self._metrics.wakes_requested.inc()
        log.info("waking job %s (%s)", job.id, job.state)
        task = loop.create_task(self._request(wake))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return wake

    async def _request(self, wake: _Wake) -> None:
        try:
            job = await self._request_wake(wake.job_id)
        except ClientError as exc:
            if not wake.done.done():
                wake.done.set_exception(exc)
            return
        # The row as the request left it: judged, not cached (the cache may be newer).
        self._judge(wake, job)

    def _judge(self, wake: _Wake, job: Job | None) -> None:
        if wake.done.done():
            return
        try:
            if assess(wake.job_id, job):
                assert job is not None
                log.info("job %s is running at %s:%s", wake.job_id, job.host, job.port)
                wake.done.set_result(job)
        except ClientError as exc:
            log.info("wake of job %s ends: %s", wake.job_id, exc.message)
            wake.done.set_exception(exc)
