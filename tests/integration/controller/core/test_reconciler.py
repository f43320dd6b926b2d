"""The reconciler on a real catalog: failures that are retried with back-off, failures
it gives up on at once, and what brings a job given up on back (retry, a new wish,
delete).

The backend is the boundary the reconciler is tested against, so it is played by
``ScriptedBackend``: each action succeeds unless the test scripted failures for it,
raised in turn (the cause going away once they are used up). Everything else is
real: the catalog's PostgreSQL, its NOTIFY, the reconciler's loop and timers, and
in the last test a router subprocess with a client waiting for a wake.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from jobmesh.agent.manifest import Manifest, new_id
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import Job
from jobmesh.controller.core.backend import (
    BackendError,
    PermanentError,
    Progress,
    Started,
    Stopped,
)
from jobmesh.controller.core.reconciler import Reconciler, ReconcilerConfig
from tests.support.catalog_harness import (
    CatalogRouters,
    add_user,
    assert_error,
    row_becomes,
    wire_login,
)
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


class ScriptedBackend:
    """The Backend protocol: every action succeeds, but for the failures scripted for it."""

    name = "scripted"

    def __init__(self) -> None:
        self.failures: dict[str, list[Exception]] = defaultdict(list)
        self.calls: list[tuple[str, float]] = []  # (action, time.monotonic()) in order
        self.pause_gate = asyncio.Event()  # a pause finishes once this is set
        self.pause_gate.set()

    def fail(self, action: str, *errors: Exception) -> None:
        """The next calls of ``action`` raise ``errors``, one each; then it works again."""
        self.failures[action].extend(errors)

    def actions(self) -> list[str]:
        return [action for action, _ in self.calls]

    def _do(self, action: str) -> None:
        self.calls.append((action, time.monotonic()))
        if self.failures[action]:
            raise self.failures[action].pop(0)

    async def start(self, on_change: Callable[[str], None] | None = None) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create(self, job: Job, progress: Progress) -> Started:
        self._do("create")
        return Started("127.0.0.1", 5999, None)

    async def resume(self, job: Job, progress: Progress) -> Started:
        self._do("resume")
        return Started("127.0.0.1", 5999, None)

    async def recover(self, job: Job, progress: Progress) -> Started:
        self._do("recover")
        return Started("127.0.0.1", 5999, None)

    async def pause(self, job: Job) -> Stopped:
        self._do("pause")
        await self.pause_gate.wait()
        return Stopped(Manifest(kind="pause", id=new_id(), job=job.id,
                                created_at=datetime.now(UTC).isoformat(), objects=[]))

    async def alive(self, job: Job) -> bool | None:
        return True

    async def delete(self, job: Job) -> None:
        self._do("delete")

    async def orphans(self, known: set[str]) -> list[str]:
        return []

    async def stop_orphan(self, job_id: str) -> None:
        pass


@dataclass
class Controller:
    reconciler: Reconciler
    backend: ScriptedBackend
    catalog: Catalog


@pytest.fixture
async def controller(catalog: Catalog) -> AsyncIterator[Controller]:
    """A reconciler running on the catalog with a scripted backend; stopped afterwards."""
    backend = ScriptedBackend()
    reconciler = Reconciler(catalog, backend, ReconcilerConfig(idle_timeout=None,
                                                               health_interval=0.2))
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop), name="reconciler")
    try:
        yield Controller(reconciler, backend, catalog)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def gave_up(catalog: Catalog, job_id: str = "alpha") -> Job:
    return await row_becomes(catalog, lambda j: j is not None and j.gave_up, job_id,
                             timeout=10)


async def state(catalog: Catalog, wanted: str, job_id: str = "alpha",
                timeout: float = 20) -> Job:
    return await row_becomes(catalog, lambda j: j is not None and j.state == wanted, job_id,
                             timeout=timeout)


# --- capacity ------------------------------------------------------------------------------


async def test_a_start_waiting_for_a_slot_goes_once_the_evicted_job_begins_pausing(
        catalog: Catalog) -> None:
    backend = ScriptedBackend()
    reconciler = Reconciler(catalog, backend, ReconcilerConfig(
        idle_timeout=None, max_running=1, quiet_for=0, resync_interval=300))
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop))
    try:
        await catalog.create_job("a")
        await state(catalog, "running", "a")
        backend.pause_gate.clear()  # a's upload takes as long as this test likes
        await catalog.create_job("b")
        await state(catalog, "pausing", "a")
        await state(catalog, "running", "b", timeout=10)  # not after a's pause: before it
        assert (await catalog.job("a")).state == "pausing"
        backend.pause_gate.set()
        await state(catalog, "paused", "a")
    finally:
        backend.pause_gate.set()
        stop.set()
        await asyncio.wait_for(task, 30)


# --- failures retrying cannot fix ----------------------------------------------------------


async def test_a_permanent_failure_is_attempted_once_and_shown_at_once(
        controller: Controller) -> None:
    controller.backend.fail("create", PermanentError("cannot import x.pgdump: not a dump"))
    started = time.monotonic()
    await controller.catalog.create_job("alpha")
    job = await gave_up(controller.catalog)
    assert time.monotonic() - started < 5
    assert (job.state, job.error, job.attempts, job.next_attempt_at) == (
        "creating", "cannot import x.pgdump: not a dump", 1, None)
    # Kicked again (a resync, a restarted controller): nothing is tried.
    await controller.reconciler.resync()
    await controller.reconciler.reconcile("alpha")
    restarted = ScriptedBackend()
    await Reconciler(controller.catalog, restarted, ReconcilerConfig()).reconcile("alpha")
    assert controller.backend.actions() == ["create"] and restarted.actions() == []
    assert (await controller.catalog.job("alpha")).attempts == 1  # type: ignore[union-attr]


async def test_an_error_raised_from_a_permanent_one_gives_up_too(
        controller: Controller) -> None:
    try:
        raise PermanentError("job alpha has no snapshot to restore from in file:///s")
    except PermanentError as exc:
        wrapped = BackendError(f"cannot resume job alpha: {exc}")
        wrapped.__cause__ = exc
    await controller.catalog.create_job("alpha")
    await state(controller.catalog, "running")
    await controller.catalog.set_desired("alpha", "paused")
    await state(controller.catalog, "paused")
    controller.backend.fail("resume", wrapped)
    await controller.catalog.request_wake("alpha")
    job = await gave_up(controller.catalog)
    assert job.state == "resuming" and job.error is not None and "no snapshot" in job.error


async def test_retry_tries_again_and_the_job_runs_once_the_cause_is_gone(
        controller: Controller) -> None:
    controller.backend.fail("create", PermanentError("the dump does not load"))
    await controller.catalog.create_job("alpha")
    await gave_up(controller.catalog)
    await controller.catalog.retry("alpha")
    job = await state(controller.catalog, "running")
    assert (job.error, job.attempts, job.gave_up) == (None, 0, False)
    assert controller.backend.actions() == ["create", "create"]


async def test_a_new_wish_of_the_user_tries_again(controller: Controller) -> None:
    controller.backend.fail("create", PermanentError("the dump does not load"))
    await controller.catalog.create_job("alpha")
    await gave_up(controller.catalog)
    await controller.catalog.set_desired("alpha", "paused")  # `jobmesh job pause alpha`
    await state(controller.catalog, "paused")
    assert controller.backend.actions() == ["create", "create", "pause"]


async def test_a_job_given_up_on_is_deleted(controller: Controller) -> None:
    controller.backend.fail("create", PermanentError("the dump does not load"))
    await controller.catalog.create_job("alpha")
    await gave_up(controller.catalog)
    await controller.catalog.set_desired("alpha", "deleted")
    await row_becomes(controller.catalog, lambda j: j is None, timeout=10)
    assert controller.backend.actions() == ["create", "delete"]


async def test_a_delete_never_gives_up(controller: Controller) -> None:
    await controller.catalog.create_job("alpha")
    await state(controller.catalog, "running")
    controller.backend.fail("delete", PermanentError("the store refused"))
    await controller.catalog.set_desired("alpha", "deleted")
    waiting = await row_becomes(controller.catalog,
                                lambda j: j is not None and j.next_attempt_at is not None,
                                timeout=10)
    assert not waiting.gave_up and waiting.error == "the store refused"
    await row_becomes(controller.catalog, lambda j: j is None, timeout=10)
    assert controller.backend.actions() == ["create", "delete", "delete"]


# --- failures that are retried ---------------------------------------------------------------


async def test_a_transient_failure_is_retried_with_back_off_until_it_works(
        controller: Controller) -> None:
    controller.backend.fail("create", BackendError("disk full"), BackendError("disk full"))
    await controller.catalog.create_job("alpha")
    waiting = await row_becomes(controller.catalog,
                                lambda j: j is not None and j.next_attempt_at is not None)
    assert (waiting.error, waiting.attempts, waiting.gave_up) == ("disk full", 1, False)
    assert waiting.next_attempt_at is not None and waiting.next_attempt_at > waiting.updated_at
    job = await state(controller.catalog, "running")
    assert (job.error, job.attempts, job.next_attempt_at) == (None, 0, None)
    times = [at for _, at in controller.backend.calls]
    assert controller.backend.actions() == ["create"] * 3
    # 1 s after the first failure, 2 s after the second (however often it was kicked).
    assert times[1] - times[0] >= 0.9 and times[2] - times[1] >= 1.9


async def test_retry_skips_the_back_off(controller: Controller) -> None:
    await controller.catalog.create_job("alpha")
    await state(controller.catalog, "running")
    await controller.catalog.set_desired("alpha", "paused")
    await state(controller.catalog, "paused")
    controller.backend.fail("resume", *[BackendError("the store is unreachable")] * 3)
    await controller.catalog.request_wake("alpha")
    # Three failures, 1 + 2 s apart; the next try would be 4 s after the third.
    job = await row_becomes(controller.catalog, lambda j: j is not None and j.attempts == 3,
                            timeout=30)
    assert job.next_attempt_at is not None
    assert (job.next_attempt_at - job.updated_at).total_seconds() >= 3.9
    retried = time.monotonic()
    await controller.catalog.retry("alpha")
    await state(controller.catalog, "running", timeout=10)
    assert time.monotonic() - retried < 3
    assert controller.backend.actions().count("resume") == 4


# --- a client waiting for a wake -------------------------------------------------------------


@pytest.fixture
def routers() -> Iterator[CatalogRouters]:
    factory = CatalogRouters()
    yield factory
    factory.stop_all()


async def test_a_client_waiting_for_a_wake_hears_at_once_that_it_was_given_up_on(
        controller: Controller, routers: CatalogRouters) -> None:
    catalog = controller.catalog
    await add_user(catalog, "alice", ("alpha", "write"))
    await catalog.create_job("alpha")
    await state(catalog, "running")
    await catalog.set_desired("alpha", "paused")
    await state(catalog, "paused")
    controller.backend.fail("resume", PermanentError(
        "job alpha has no snapshot to restore from in file:///store"))
    router = await routers.start(catalog.dsn, "--wake-timeout", "60")
    started = time.monotonic()
    login = await asyncio.wait_for(wire_login(router.port), 30)
    assert time.monotonic() - started < 15  # not the 60 s wake timeout
    error = assert_error(login, "57P03", "jobmesh job retry alpha")
    assert "no snapshot to restore from" in error["M"]
    assert login.notices[0] == "waking job_alpha"


async def test_a_clean_stop_does_not_report_a_lost_listen_connection(
        catalog: Catalog, caplog: pytest.LogCaptureFixture) -> None:
    reconciler = Reconciler(catalog, ScriptedBackend(), ReconcilerConfig(idle_timeout=None))
    stop = asyncio.Event()
    task = asyncio.create_task(reconciler.run(stop))
    await catalog.create_job("quiet", {})  # the loop is up once it has seen this
    with caplog.at_level("WARNING", logger="jobmesh.controller"):
        await until(lambda: reconciler._listener is not None, "the LISTEN connection")
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [r.getMessage() for r in caplog.records if "LISTEN" in r.getMessage()] == []
