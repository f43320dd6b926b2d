"""The reconciler: make every job's state follow its desired state, one job at a time.

Level-triggered: whatever woke it (a NOTIFY, the periodic resync, a retry
timer, a health check), it re-reads the job's row, asks the backend whether
the job's processes are alive, and lets :func:`lifecycle.decide`
say what to do. Work for one job is never run twice at once (a job has at
most one worker task; a kick during work re-runs it afterwards), and every
step is recorded in the catalog before and after, so a controller killed at
any point finds the in-flight state after restart and finishes the work.

A failed step is retried with back-off (the row says when: ``next_attempt_at``),
unless retrying cannot fix it (a ``PermanentError``, or an error raised from
one): then the row says ``gave_up`` and the job is left alone, so waiting
clients and commands hear of it at once, until the user retries it, wants
something else of it, or deletes it (deletes always run).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from jobmesh import defaults

from ..catalog.db import Catalog
from ..catalog.models import CHECK_CHANNEL, JOBS_CHANNEL, Job
from ..catalog.states import JobState
from . import lifecycle
from .backend import Backend, PermanentError, Progress, Started, Stopped
from .lifecycle import Action, Activity, Step
from .metrics import ControllerMetrics
from .step_queue import StepQueue

log = logging.getLogger("jobmesh.controller")


@dataclass(frozen=True)
class ReconcilerConfig:
    resync_interval: float = 30.0   # re-read every job even without NOTIFY
    health_interval: float = 2.0    # how often running jobs' processes are checked
    idle_timeout: float | None = defaults.IDLE_TIMEOUT  # pause unused jobs (None: never)
    max_running: int | None = None  # at most this many jobs up at once
    quiet_for: float = 15.0         # a job is evictable after this long without sessions
    retry_max: float = 60.0         # the longest back-off between failed attempts
    # How many starts (create, resume, recover) and stops (pause, end) run at once: a storm
    # queues (its clients hear their place) instead of starving every step of CPU.
    max_starting: int = defaults.MAX_STARTING
    max_stopping: int = defaults.MAX_STOPPING


class Reconciler:
    def __init__(self, catalog: Catalog, backend: Backend, config: ReconcilerConfig,
                 metrics: ControllerMetrics | None = None) -> None:
        self.catalog = catalog
        self.backend = backend
        self.config = config
        self.metrics = metrics or ControllerMetrics()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._waiting_for_room: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # After a failure, the same work is not retried before its back-off ends, however
        # often the job is kicked (recording the failure itself NOTIFYs).
        self._backoff: dict[str, tuple[Action, float]] = {}
        self._listener: asyncpg.Connection | None = None
        self._resync = asyncio.Event()
        self._queues = {"start": StepQueue("start", config.max_starting),
                        "stop": StepQueue("stop", config.max_stopping)}

    # --- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until ``stop`` is set; work in flight is finished, not abandoned."""
        await self.backend.start(self.kick)
        await self._listen()
        await self._stop_orphans()
        tasks = [asyncio.create_task(self._resync_loop(stop), name="resync"),
                 asyncio.create_task(self._health_loop(stop), name="health")]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for timer in self._timers.values():
                timer.cancel()
            if self._workers:
                await asyncio.wait(list(self._workers.values()))
            if self._listener is not None:
                listener, self._listener = self._listener, None  # (closing it is not a loss)
                with contextlib.suppress(Exception):
                    await listener.close()
            await self.backend.close()

    async def _listen(self) -> None:
        def lost() -> None:
            if self._listener is None:
                return  # closed by run() on the way out
            log.warning("lost the catalog LISTEN connection; resyncing")
            self._listener = None
            self._resync.set()
        # A router's report that a job does not answer: the same look as the health check's.
        self._listener = await self.catalog.listen({JOBS_CHANNEL: self.kick,
                                                    CHECK_CHANNEL: self.kick}, on_lost=lost)

    async def _stop_orphans(self) -> None:
        known = {j.id for j in await self.catalog.jobs()}
        for job_id in await self.backend.orphans(known):
            log.info("stopping instance of unknown job %s (its data is kept)", job_id)
            await self.backend.stop_orphan(job_id)

    async def _resync_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.resync_interval
        if self.config.idle_timeout is not None:
            interval = min(interval, max(self.config.idle_timeout / 4, 0.2))
        while not stop.is_set():
            try:
                if self._listener is None:
                    await self._listen()
                await self.resync()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("resync failed: %s", exc)
            self._resync.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync.wait(), interval)

    async def resync(self) -> None:
        """Kick every job; pause idle ones; make room for jobs waiting to start."""
        jobs = await self.catalog.jobs()
        self.metrics.set_job_states(j.state for j in jobs)
        now = datetime.now(UTC)
        activity = [_activity(j) for j in jobs]
        if self.config.idle_timeout is not None:
            for job_id in lifecycle.idle(activity, now, self.config.idle_timeout):
                if await self.catalog.pause_if_idle(job_id, self.config.idle_timeout):
                    log.info("job %s idle for %gs: pausing", job_id, self.config.idle_timeout)
        await self._evict(activity, now)
        for j in jobs:
            self.kick(j.id)

    async def _health_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.config.health_interval)
            try:
                for job in await self.catalog.jobs():
                    if job.state == JobState.RUNNING and await self.backend.alive(job) is False:
                        self.kick(job.id)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("health check failed: %s", exc)

    async def _evict(self, activity: list[Activity], now: datetime) -> None:
        for job_id in lifecycle.evictions(activity, self.config.max_running, now,
                                          self.config.quiet_for, self._waiting_for_room):
            if await self.catalog.pause_if_idle(job_id, self.config.quiet_for, reason="evicted"):
                log.info("job %s evicted to make room (max_running=%s)", job_id,
                         self.config.max_running)

    # --- one job --------------------------------------------------------------------------

    def kick(self, job_id: str) -> None:
        """Reconcile ``job_id`` soon; never two workers for one job."""
        if job_id in self._workers:
            self._dirty.add(job_id)
            return
        task = asyncio.get_running_loop().create_task(self._work(job_id), name=f"job-{job_id}")
        self._workers[job_id] = task

    async def _work(self, job_id: str) -> None:
        try:
            self._dirty.add(job_id)
            while job_id in self._dirty:
                self._dirty.discard(job_id)
                try:
                    await self.reconcile(job_id)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("job %s: catalog unavailable: %s", job_id, exc)
                    self._retry(job_id, 1)
        finally:
            del self._workers[job_id]

    async def reconcile(self, job_id: str) -> None:
        job = await self.catalog.job(job_id)
        if job is None:
            return
        alive = await self.backend.alive(job) if job.state == JobState.RUNNING else None
        step = lifecycle.decide(job.state, job.desired_state, alive, gave_up=job.gave_up)
        if step.action is Action.NOTHING:
            return
        backoff = self._backoff.get(job.id)
        if backoff is not None:
            # A retry still due in the row: the timer kicks the job when the back-off ends.
            # None there: the user asked to retry now (or wants something new).
            if (backoff[0] is step.action and job.next_attempt_at is not None
                    and time.monotonic() < backoff[1]):
                return
            del self._backoff[job.id]
        if step.action is Action.SETTLE:
            assert step.done is not None
            await self.catalog.transition(job.id, job.state, step.done)
            self._room_freed()
            return
        if step.action is Action.FAIL:
            log.warning("job %s: PostgreSQL is not running: marking failed", job.id)
            await self.catalog.transition(job.id, JobState.RUNNING, JobState.FAILED,
                                          error="PostgreSQL stopped unexpectedly")
            self.metrics.failures.inc()
            self._dirty.add(job.id)
            return
        if step.action is Action.CREATE and not await self._room_for(job):
            return  # a create waits for room as a wake does (kicked when a slot frees)
        if step.in_flight is not None and job.state != step.in_flight:
            if step.action in (Action.RESUME, Action.RECOVER) and not await self._room_for(job):
                return
            moved = await self.catalog.transition(job.id, job.state, step.in_flight)
            if moved is None:
                self._dirty.add(job.id)  # someone else moved it: look again
                return
            job = moved
            if step.action in (Action.PAUSE, Action.END):
                # A stopping job holds no slot (lifecycle.has_room): the starts waiting for
                # one go now, not once its upload is done.
                self._room_freed()
        await self._execute(job, step)

    async def _room_for(self, job: Job) -> bool:
        if self.config.max_running is None:
            return True
        jobs = await self.catalog.jobs()
        activity = [_activity(j) for j in jobs]
        if lifecycle.has_room(activity, job.id, self.config.max_running,
                              self._waiting_for_room):
            self._waiting_for_room.discard(job.id)
            return True
        self._waiting_for_room.add(job.id)
        await self.catalog.set_progress(job.id, "waiting for a free slot (max_running="
                                        f"{self.config.max_running})")
        await self._evict(activity, datetime.now(UTC))
        return False

    def _room_freed(self) -> None:
        for job_id in list(self._waiting_for_room):
            self.kick(job_id)

    async def _execute(self, job: Job, step: Step) -> None:
        async def progress(text: str) -> None:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.catalog.set_progress(job.id, text)

        queue = self._queues.get(_QUEUE_OF.get(step.action, ""))
        if queue is not None:
            async with queue.turn(job.id, progress):
                await self._run_step(job, step, progress)
        else:
            await self._run_step(job, step, progress)

    async def _run_step(self, job: Job, step: Step, progress: Progress) -> None:
        started_at = time.monotonic()
        log.info("job %s: %s (%s -> %s)", job.id, step.action.value, job.state, step.done)
        try:
            if step.action in (Action.CREATE, Action.RESUME, Action.RECOVER):
                # A new incarnation, perhaps: it takes the next generation (a recovery in
                # place keeps its agent and that agent's generation; gaps are harmless).
                job = dataclasses.replace(job, generation=await self.catalog.next_generation(
                    job.id))
            match step.action:
                case Action.CREATE:
                    result: Started | Stopped | None = await self.backend.create(job, progress)
                case Action.RESUME:
                    result = await self.backend.resume(job, progress)
                case Action.RECOVER:
                    result = await self.backend.recover(job, progress)
                case Action.PAUSE | Action.END:
                    result = await self.backend.pause(job)
                case Action.DELETE:
                    await self.backend.delete(job)
                    result = None
                case _:
                    raise AssertionError(step)
        except Exception as exc:  # the backend's failure: recorded; retried, or given up on
            await self._failed(job, step, exc)
            return
        seconds = time.monotonic() - started_at
        await self._finish(job, step, result, seconds)

    async def _failed(self, job: Job, step: Step, exc: Exception) -> None:
        """Record a failed step: retried after its back-off, or given up on."""
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        self.metrics.action_failures.labels(step.action.value).inc()
        if lifecycle.gives_up(step.action, permanent(exc)):
            log.error("job %s: %s failed, and retrying cannot fix it (left until "
                      "`jobmesh job retry %s`): %s", job.id, step.action.value, job.id, error)
            self._forget_retry(job.id)
            await self.catalog.failed_attempt(job.id, job.state, error, gave_up=True)
            return
        delay = self._retry(job.id, job.attempts + 1)
        log.warning("job %s: %s failed (retrying in %g s): %s", job.id, step.action.value,
                    delay, error)
        self._backoff[job.id] = (step.action, time.monotonic() + delay)
        await self.catalog.failed_attempt(job.id, job.state, error,
                                          next_attempt_at=datetime.now(UTC)
                                          + timedelta(seconds=delay))

    async def _finish(self, job: Job, step: Step, result: Started | Stopped | None,
                      seconds: float) -> None:
        self.metrics.action_seconds.labels(step.action.value).observe(seconds)
        if step.done is None:
            await self.catalog.delete_job_row(job.id)
            self._room_freed()
            return
        if isinstance(result, Started):
            self.metrics.bytes_moved.labels("restored").inc(result.bytes_moved)
            await self.catalog.transition(
                job.id, job.state, step.done, host=result.host, port=result.port,
                agent_url=result.agent_url, duration_ms=seconds * 1000,
                bytes_moved=result.bytes_moved, detail=result.detail)
            self._waiting_for_room.discard(job.id)
            if step.action is Action.RESUME:
                await self._observe_wake(job)
        elif isinstance(result, Stopped):
            self.metrics.bytes_moved.labels("stored").inc(result.bytes_moved)
            await self.catalog.record_snapshot(job.id, result.manifest.summary())
            await self.catalog.transition(
                job.id, job.state, step.done, duration_ms=seconds * 1000,
                bytes_moved=result.bytes_moved,
                detail={"snapshot": result.manifest.id})
            self._room_freed()
        log.info("job %s: %s in %.0f ms", job.id, step.done, seconds * 1000)

    async def _observe_wake(self, job: Job) -> None:
        """Wake latency: from the wake request to running (when a client asked)."""
        events = await self.catalog.events(job.id, kind="wake-requested", limit=1)
        # Only a request that led to this start (made just before it began) counts.
        if events and events[-1].at >= job.updated_at - timedelta(seconds=5):
            self.metrics.wake_seconds.observe((datetime.now(UTC) - events[-1].at)
                                              .total_seconds())

    def _retry(self, job_id: str, attempts: int) -> float:
        delay = lifecycle.retry_delay(attempts, self.config.retry_max)
        loop = asyncio.get_running_loop()
        old = self._timers.pop(job_id, None)
        if old is not None:
            old.cancel()
        self._timers[job_id] = loop.call_later(delay, self._retry_now, job_id)
        return delay

    def _forget_retry(self, job_id: str) -> None:
        timer = self._timers.pop(job_id, None)
        if timer is not None:
            timer.cancel()
        self._backoff.pop(job_id, None)

    def _retry_now(self, job_id: str) -> None:
        self._timers.pop(job_id, None)
        self._backoff.pop(job_id, None)
        self.kick(job_id)


_QUEUE_OF = {Action.CREATE: "start", Action.RESUME: "start", Action.RECOVER: "start",
             Action.PAUSE: "stop", Action.END: "stop"}


def _activity(job: Job) -> Activity:
    return Activity(job.id, job.state, job.desired_state, job.last_active, job.gave_up)


def permanent(exc: BaseException) -> bool:
    """Can retrying not fix ``exc``? A ``PermanentError``, or an error raised from one
    (``raise BackendError(...) from exc``: a backend wrapping what it called keeps the
    failure permanent). Only explicit causes count: an error raised while handling
    one (a cleanup that failed) says nothing about whether a retry helps."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, PermanentError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__
    return False
