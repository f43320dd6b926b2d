"""The job lifecycle as pure decisions: given what is wanted and what is, what to do next.

The reconciler reads a job's row, asks the backend whether its processes are
alive, and calls :func:`decide`. Every action names the state it starts from,
the in-flight state it records first, and the state it ends in, so a
controller killed mid-transition finds the in-flight state after restart and
does the same (idempotent) work again.

States (DESIGN.md "The job lifecycle")::

    creating -> running -> pausing -> paused -> resuming -> running
    running -> ending -> ended            running -> failed -> recovering -> running
    any -> deleting -> (row gone)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

STATES = ("creating", "running", "pausing", "paused", "resuming", "ending", "ended",
          "failed", "recovering", "deleting")
DESIRED = ("running", "paused", "ended", "deleted")
# States in which the job holds (or is about to hold) processes on a backend.
ACTIVE = frozenset({"creating", "running", "pausing", "resuming", "ending", "recovering"})


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
    in_flight: str | None  # the state recorded before the work starts
    done: str | None       # the state recorded when it succeeded (None: row deleted)


NOTHING = Step(Action.NOTHING, None, None)


def decide(state: str, desired: str, alive: bool | None) -> Step:
    """What to do for one job. ``alive``: are its processes running (None: unknown)."""
    if desired == "deleted":
        return Step(Action.DELETE, "deleting", None)
    match state:
        case "creating":
            return Step(Action.CREATE, "creating", "running")
        case "running":
            if alive is False:
                return Step(Action.FAIL, None, "failed")
            if desired == "paused":
                return Step(Action.PAUSE, "pausing", "paused")
            if desired == "ended":
                return Step(Action.END, "ending", "ended")
            return NOTHING
        case "pausing":
            return Step(Action.PAUSE, "pausing", "paused")
        case "ending":
            return Step(Action.END, "ending", "ended")
        case "resuming":
            return Step(Action.RESUME, "resuming", "running")
        case "recovering":
            return Step(Action.RECOVER, "recovering", "running")
        case "paused" | "ended":
            if desired == "running":
                return Step(Action.RESUME, "resuming", "running")
            if desired != state:
                return Step(Action.SETTLE, None, desired)  # paused <-> ended: data is stored
            return NOTHING
        case "failed":
            if desired == "running":
                return Step(Action.RECOVER, "recovering", "running")
            # The store holds the latest recovery point and WAL; a resume replays them.
            return Step(Action.SETTLE, None, desired)
        case "deleting":
            return Step(Action.DELETE, "deleting", None)
    raise ValueError(f"unknown job state {state!r}")


@dataclass(frozen=True)
class Activity:
    """What idle pause and eviction need to know about a job."""

    job_id: str
    state: str
    desired: str
    last_active: datetime


def idle(jobs: Iterable[Activity], now: datetime, idle_timeout: float) -> list[str]:
    """Running jobs that nobody used for ``idle_timeout`` seconds."""
    cutoff = now - timedelta(seconds=idle_timeout)
    return [j.job_id for j in jobs
            if j.state == "running" and j.desired == "running" and j.last_active < cutoff]


def _holds_slot(j: Activity) -> bool:
    return j.state in ACTIVE and j.state != "pausing" and j.desired == "running"


def has_room(jobs: Iterable[Activity], job_id: str, max_running: int | None) -> bool:
    """May ``job_id`` start now without exceeding ``max_running`` (None: no limit)?"""
    if max_running is None:
        return True
    return sum(1 for j in jobs if j.job_id != job_id and _holds_slot(j)) < max_running


def evictions(jobs: Sequence[Activity], max_running: int | None, now: datetime,
              quiet_for: float) -> list[str]:
    """Which running jobs to pause so that the jobs waiting to start fit in ``max_running``.

    A job waiting to start (wanted running, still paused, ended or failed) needs
    a slot; the least recently active running jobs that have been quiet for
    ``quiet_for`` seconds (no router reported a session in that time) give
    theirs. Busy jobs are never evicted: when none is quiet, the wake waits.
    """
    if max_running is None:
        return []
    holding = [j for j in jobs if _holds_slot(j)]
    waiting = [j for j in jobs if j.state in ("paused", "ended", "failed")
               and j.desired == "running"]
    over = len(holding) + len(waiting) - max_running
    if over <= 0:
        return []
    cutoff = now - timedelta(seconds=quiet_for)
    candidates = sorted((j for j in holding if j.state == "running" and j.last_active < cutoff),
                        key=lambda j: j.last_active)
    return [j.job_id for j in candidates[:over]]
