"""The job lifecycle as pure decisions: given what is wanted and what is, what to do next.

The reconciler reads a job's row, asks the backend whether its processes are
alive, and calls :func:`decide`. Every action names the state it starts from,
the in-flight state it records first, and the state it ends in, so a
controller killed mid-transition finds the in-flight state after restart and
does the same (idempotent) work again.

The states (``catalog/states.py``)::

    creating -> running -> pausing -> paused -> resuming -> running
    running -> ending -> ended            running -> failed -> recovering -> running
    any -> deleting -> (row gone)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..catalog.states import ACTIVE, DesiredState, JobState, settled


class Action(enum.Enum):
    NOTHING = "nothing"
    CREATE = "create"      # new PGDATA (template, import, fork), start it
    PAUSE = "pause"        # snapshot through the agent, stop, free the local copy
    RESUME = "resume"      # restore the latest snapshot (+ WAL), start
    END = "end"            # like pause, but the job stays down
    FAIL = "fail"          # the processes died: record it (recovery follows)
    RECOVER = "recover"    # restore the latest recovery point + archived WAL, start
    SETTLE = "settle"      # no work: the stored data already is the wanted state
    DELETE = "delete"      # stop everything, drop local data and the row


@dataclass(frozen=True)
class Step:
    action: Action
    in_flight: JobState | None  # the state recorded before the work starts
    done: JobState | None       # the state recorded when it succeeded (None: row deleted)


NOTHING = Step(Action.NOTHING, None, None)


def decide(state: JobState, desired: DesiredState, alive: bool | None, *,
           gave_up: bool = False) -> Step:
    """What to do for one job. ``alive``: are its processes running (None: unknown);
    ``gave_up``: its last attempt failed in a way retrying cannot fix, so nothing is
    done until the user retries it or wants something else, except a delete."""
    if desired == DesiredState.DELETED:
        return Step(Action.DELETE, JobState.DELETING, None)
    if gave_up:
        return NOTHING
    match state:
        case JobState.CREATING:
            return Step(Action.CREATE, JobState.CREATING, JobState.RUNNING)
        case JobState.RUNNING:
            if alive is False:
                return Step(Action.FAIL, None, JobState.FAILED)
            if desired == DesiredState.PAUSED:
                return Step(Action.PAUSE, JobState.PAUSING, JobState.PAUSED)
            if desired == DesiredState.ENDED:
                return Step(Action.END, JobState.ENDING, JobState.ENDED)
            return NOTHING
        case JobState.PAUSING:
            return Step(Action.PAUSE, JobState.PAUSING, JobState.PAUSED)
        case JobState.ENDING:
            return Step(Action.END, JobState.ENDING, JobState.ENDED)
        case JobState.RESUMING:
            return Step(Action.RESUME, JobState.RESUMING, JobState.RUNNING)
        case JobState.RECOVERING:
            return Step(Action.RECOVER, JobState.RECOVERING, JobState.RUNNING)
        case JobState.PAUSED | JobState.ENDED:
            if desired == DesiredState.RUNNING:
                return Step(Action.RESUME, JobState.RESUMING, JobState.RUNNING)
            if settled(desired) != state:  # paused <-> ended: the data is stored
                return Step(Action.SETTLE, None, settled(desired))
            return NOTHING
        case JobState.FAILED:
            if desired == DesiredState.RUNNING:
                return Step(Action.RECOVER, JobState.RECOVERING, JobState.RUNNING)
            # The store holds the latest recovery point and WAL; a resume replays them.
            return Step(Action.SETTLE, None, settled(desired))
        case JobState.DELETING:
            return Step(Action.DELETE, JobState.DELETING, None)
    raise ValueError(f"unknown job state {state!r}")


def retry_delay(attempts: int, longest: float) -> float:
    """Seconds until the next try after ``attempts`` failed ones: 1 s doubling (0.5 s
    times 2^attempts), at most ``longest``."""
    return min(0.5 * 2.0 ** min(attempts, 10), longest)


def gives_up(action: Action, permanent: bool) -> bool:
    """Is a failure of ``action`` the end of trying? Only a permanent one, and never for
    a delete: a deletion is what the user does about a job that gave up, so it must
    always go on."""
    return permanent and action is not Action.DELETE


@dataclass(frozen=True)
class Activity:
    """What idle pause and eviction need to know about a job."""

    job_id: str
    state: JobState
    desired: DesiredState
    last_active: datetime
    gave_up: bool = False  # its last attempt failed for good: it waits for the user


def idle(jobs: Iterable[Activity], now: datetime, idle_timeout: float) -> list[str]:
    """Running jobs that nobody used for ``idle_timeout`` seconds."""
    cutoff = now - timedelta(seconds=idle_timeout)
    return [j.job_id for j in jobs
            if j.state == JobState.RUNNING and j.desired == DesiredState.RUNNING
            and j.last_active < cutoff]


def _holds_slot(j: Activity) -> bool:
    # A job given up on mid-start holds no processes (the backend freed them): no slot.
    return (j.state in ACTIVE and j.state != JobState.PAUSING
            and j.desired == DesiredState.RUNNING
            and not (j.gave_up and j.state != JobState.RUNNING))


def has_room(jobs: Iterable[Activity], job_id: str, max_running: int | None,
             waiting: AbstractSet[str] = frozenset()) -> bool:
    """May ``job_id`` start now without exceeding ``max_running`` (None: no limit)?
    ``waiting``: jobs known to wait for a slot (creates among them hold none yet)."""
    if max_running is None:
        return True
    return sum(1 for j in jobs if j.job_id != job_id and j.job_id not in waiting
               and _holds_slot(j)) < max_running


# Stopped jobs: wanted running, they wait for a slot to start in.
_STOPPED = frozenset({JobState.PAUSED, JobState.ENDED, JobState.FAILED})


def evictions(jobs: Sequence[Activity], max_running: int | None, now: datetime,
              quiet_for: float, waiting: AbstractSet[str] = frozenset()) -> list[str]:
    """Which running jobs to pause so that the jobs waiting to start fit in ``max_running``.

    A job waiting to start (wanted running, still paused, ended or failed, or a
    create in ``waiting``) needs a slot; the least recently active running jobs
    that have been quiet for ``quiet_for`` seconds (no router reported a session
    in that time) give theirs. Busy jobs are never evicted: when none is quiet,
    the wake waits.
    """
    if max_running is None:
        return []
    holding = [j for j in jobs if _holds_slot(j) and j.job_id not in waiting]
    starting = [j for j in jobs if not j.gave_up and (
        j.job_id in waiting or (j.state in _STOPPED and j.desired == DesiredState.RUNNING))]
    over = len(holding) + len(starting) - max_running
    if over <= 0:
        return []
    cutoff = now - timedelta(seconds=quiet_for)
    candidates = sorted((j for j in holding
                         if j.state == JobState.RUNNING and j.last_active < cutoff),
                        key=lambda j: j.last_active)
    return [j.job_id for j in candidates[:over]]
