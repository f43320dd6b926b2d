"""The lifecycle's pure decisions: every state and desired state, giving up and back-off,
idle pause, eviction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobmesh.controller.catalog.states import DesiredState as DESIRED
from jobmesh.controller.catalog.states import JobState as STATES
from jobmesh.controller.core.lifecycle import (
    Action,
    Activity,
    decide,
    evictions,
    gives_up,
    has_room,
    idle,
    retry_delay,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("state", "desired", "alive", "action", "in_flight", "done"), [
    ("creating", "running", None, Action.CREATE, "creating", "running"),
    ("running", "running", True, Action.NOTHING, None, None),
    ("running", "running", False, Action.FAIL, None, "failed"),
    ("running", "paused", True, Action.PAUSE, "pausing", "paused"),
    ("running", "ended", True, Action.END, "ending", "ended"),
    ("pausing", "paused", None, Action.PAUSE, "pausing", "paused"),
    ("pausing", "running", None, Action.PAUSE, "pausing", "paused"),  # finish, then resume
    ("paused", "running", None, Action.RESUME, "resuming", "running"),
    ("paused", "paused", None, Action.NOTHING, None, None),
    ("paused", "ended", None, Action.SETTLE, None, "ended"),
    ("resuming", "running", None, Action.RESUME, "resuming", "running"),
    ("resuming", "paused", None, Action.RESUME, "resuming", "running"),  # finish, then pause
    ("ended", "running", None, Action.RESUME, "resuming", "running"),
    ("failed", "running", None, Action.RECOVER, "recovering", "running"),
    ("failed", "paused", None, Action.SETTLE, None, "paused"),
    ("recovering", "running", None, Action.RECOVER, "recovering", "running"),
    ("ending", "ended", None, Action.END, "ending", "ended"),
    ("running", "deleted", True, Action.DELETE, "deleting", None),
    ("deleting", "deleted", None, Action.DELETE, "deleting", None),
])
def test_decide(state: str, desired: str, alive: bool | None, action: Action,
                in_flight: str | None, done: str | None) -> None:
    step = decide(state, desired, alive)
    assert (step.action, step.in_flight, step.done) == (action, in_flight, done)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("desired", DESIRED)
def test_every_decision_ends_in_a_known_state(state: str, desired: str) -> None:
    step = decide(state, desired, True)
    assert step.in_flight in (None, *STATES)
    assert step.done in (None, *STATES)
    if step.action is Action.DELETE:
        assert step.done is None


def test_interrupted_work_is_redone_from_its_in_flight_state() -> None:
    """A controller killed mid-transition finds the in-flight state; deciding again
    from it gives the same work and the same end."""
    for state in STATES:
        for desired in DESIRED:
            step = decide(state, desired, True)
            if step.in_flight is None:
                continue
            again = decide(step.in_flight, desired, None)
            assert (again.action, again.done) == (step.action, step.done), (state, desired)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("desired", [d for d in DESIRED if d != DESIRED.DELETED])
def test_a_job_given_up_on_is_left_alone(state: str, desired: str) -> None:
    assert decide(state, desired, False, gave_up=True).action is Action.NOTHING


@pytest.mark.parametrize("state", STATES)
def test_a_job_given_up_on_is_still_deleted(state: str) -> None:
    step = decide(state, DESIRED.DELETED, None, gave_up=True)
    assert (step.action, step.in_flight, step.done) == (Action.DELETE, "deleting", None)


def test_only_permanent_failures_give_up_and_never_a_delete() -> None:
    for action in Action:
        assert not gives_up(action, permanent=False)
        assert gives_up(action, permanent=True) == (action is not Action.DELETE)


def test_retries_back_off_from_one_second_doubling_up_to_the_longest() -> None:
    assert [retry_delay(n, 60) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10_000, 60) == 60  # no overflow, however many attempts failed
    assert retry_delay(3, 2.5) == 2.5


def _job(job_id: str, state: str = "running", desired: str = "running",
         idle_s: float = 0) -> Activity:
    return Activity(job_id, state, desired, NOW - timedelta(seconds=idle_s))


def test_idle_finds_running_jobs_unused_past_the_timeout() -> None:
    jobs = [_job("a", idle_s=700), _job("b", idle_s=10), _job("c", "paused", "paused", 9999),
            _job("d", "resuming", idle_s=9999)]
    assert idle(jobs, NOW, 600) == ["a"]


def test_has_room_counts_jobs_that_hold_or_take_a_slot() -> None:
    jobs = [_job("a"), _job("b", "resuming"), _job("c", "pausing", "paused"),
            _job("d", "paused", "running")]
    assert has_room(jobs, "d", 3)
    assert not has_room(jobs, "d", 2)
    assert has_room(jobs, "d", None)


def test_evictions_pick_the_least_recently_active_quiet_jobs() -> None:
    jobs = [_job("a", idle_s=100), _job("b", idle_s=300), _job("c", idle_s=1),
            _job("w", "paused", "running")]
    assert evictions(jobs, 3, NOW, quiet_for=15) == ["b"]
    assert evictions(jobs, 2, NOW, quiet_for=15) == ["b", "a"]
    assert evictions(jobs, 4, NOW, quiet_for=15) == []


def test_creates_waiting_for_a_slot_hold_none_and_each_gets_an_eviction() -> None:
    jobs = [_job("a", idle_s=100), _job("b", idle_s=300), _job("c", idle_s=200),
            _job("n1", "creating"), _job("n2", "creating")]
    # Both creates wait (they started nothing yet): each needs a slot of a running job.
    assert evictions(jobs, 3, NOW, quiet_for=15, waiting={"n1", "n2"}) == ["b", "c"]
    assert not has_room(jobs, "n1", 3, waiting={"n1", "n2"})
    assert has_room(jobs, "n1", 4, waiting={"n1", "n2"})  # n2 waits: it holds nothing
    assert not has_room(jobs, "n1", 4)  # (not known to wait: it may be starting)


def test_busy_jobs_are_never_evicted() -> None:
    jobs = [_job("a", idle_s=1), _job("b", idle_s=2), _job("w", "paused", "running")]
    assert evictions(jobs, 2, NOW, quiet_for=15) == []


def test_a_job_given_up_on_mid_start_holds_no_slot_and_waits_for_none() -> None:
    stuck = [Activity("c", STATES.CREATING, DESIRED.RUNNING, NOW, gave_up=True),
             Activity("r", STATES.RECOVERING, DESIRED.RUNNING, NOW, gave_up=True)]
    jobs = [_job("a", idle_s=100), *stuck]
    assert has_room(jobs, "d", 2)  # only "a" holds one
    # A job that gave up waits for the user, not for a slot: nobody is evicted for it.
    waiting = [_job("a", idle_s=100),
               Activity("w", STATES.PAUSED, DESIRED.RUNNING, NOW, gave_up=True)]
    assert evictions(waiting, 1, NOW, quiet_for=15) == []
    # Running and given up (a pause that cannot be done) still holds its processes.
    assert not has_room([Activity("p", STATES.RUNNING, DESIRED.RUNNING, NOW,
                                  gave_up=True)], "d", 1)
