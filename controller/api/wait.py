"""Waiting for a job to reach a state, for requests that return once the work is done.

One LISTEN connection on the catalog's jobs channel is shared by every
waiting request (opened at the first wait, reopened after a loss); each
announcement wakes the waiters of that job, which re-read the row. Every
waiter also re-reads every few seconds, so a notification lost with a
dropped connection costs a moment, never the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from jobmesh.errors import one_line

from ..catalog.db import Catalog
from ..catalog.models import JOBS_CHANNEL, Job
from ..catalog.states import DesiredState, settled
from .request import ApiError

log = logging.getLogger("jobmesh.controller.api")

RECHECK = 5.0  # seconds between re-reads when no announcement came


class JobWatch:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._conn: asyncpg.Connection | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._followers: set[asyncio.Queue[str | None]] = set()
        self._lock = asyncio.Lock()

    async def wait(self, job_id: str, target: DesiredState, timeout: float) -> Job | None:
        """The job once it is what ``target`` asks ("deleted": once its row is gone).

        ``target`` is also the desired state the caller set: when someone else wants
        something else meanwhile (a client's connect woke a job being paused), the wait
        ends with a 409 rather than running into its timeout. So it does, at once, when
        the controller gave up on the job (a failure retrying cannot fix).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._watching(job_id) as changed:
            while True:
                changed.clear()  # before the read: an announcement after it wakes us
                job = await self._catalog.job(job_id)
                if job is None:
                    if target == DesiredState.DELETED:
                        return None
                    raise ApiError(404, f"job {job_id} was deleted while waiting for it to "
                                        f"be {target}", "`jobmesh job list` shows the jobs")
                if job.state == settled(target):
                    return job
                if job.desired_state != target:
                    raise ApiError(409, f"job {job_id} is now wanted {job.desired_state}, no "
                                        f"longer {target} (it is {job.state})",
                                   "someone changed it meanwhile; `jobmesh job show "
                                   f"{job_id}` shows its events")
                if job.gave_up and target != DesiredState.DELETED:  # deletes never give up
                    raise gave_up(job)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _timed_out(job, target, timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(remaining, RECHECK))

    @contextlib.asynccontextmanager
    async def _watching(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        changed = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(changed)
        try:
            await self._listen()
            yield changed
        finally:
            waiters = self._waiters.get(job_id, set())
            waiters.discard(changed)
            if not waiters:
                self._waiters.pop(job_id, None)

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[asyncio.Queue[str | None]]:
        """Every announcement while the block runs: a job's id, or None when some may
        have been lost (the LISTEN connection dropped, or the block fell behind)."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=1000)
        self._followers.add(queue)
        try:
            await self._listen()
            if self._conn is None:
                queue.put_nowait(None)  # not listening: the follower re-reads on its own
            yield queue
        finally:
            self._followers.discard(queue)

    async def relisten(self) -> bool:
        """LISTEN again if the connection was lost (followers call it now and then);
        whether we listen now."""
        await self._listen()
        return self._conn is not None

    def _tell(self, change: str | None) -> None:
        for queue in self._followers:
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:  # behind by a thousand: it re-reads everything
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)

    async def _listen(self) -> None:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            try:
                self._conn = await self._catalog.listen({JOBS_CHANNEL: self._announced},
                                                        on_lost=self._lost)
            except (OSError, asyncpg.PostgresError) as exc:
                # The re-reads still see every change, only later.
                log.warning("cannot LISTEN on the catalog (waiting by re-reading): %s", exc)

    def _announced(self, job_id: str) -> None:
        for changed in self._waiters.get(job_id, ()):
            changed.set()
        self._tell(job_id)

    def _lost(self) -> None:
        self._conn = None
        self._tell(None)
        for waiters in self._waiters.values():
            for changed in waiters:
                changed.set()  # re-read now: what changed while nobody listened is unknown

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await conn.close()


def gave_up(job: Job) -> ApiError:
    """The answer to a wait for a job the controller gave up on: its error, and what the
    user can do about it."""
    return ApiError(409, f"job {job.id}: {one_line(job.error or 'failed')}",
                    f"it will not be retried: fix the cause, then `jobmesh job retry {job.id}` "
                    f"(POST /v1/jobs/{job.id}/retry), or `jobmesh job delete {job.id}`")


def _timed_out(job: Job, target: DesiredState, timeout: float) -> ApiError:
    doing = f" ({job.progress})" if job.progress else ""
    failed = f"; last error: {one_line(job.error)}" if job.error else ""
    return ApiError(504, f"job {job.id} is still {job.state}{doing} after {timeout:g} s, "
                         f"not yet {target}{failed}",
                    f"the controller keeps working on it: see `jobmesh job show {job.id}`; is "
                    "`jobmesh up` (or `jobmesh controller`) running?")
