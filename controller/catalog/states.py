"""The words the catalog stores for a job's state, its wanted state and a grant's access.

Each is a ``StrEnum``, so a member is its own string: the values in the
database, on the wire (HTTP API, NOTIFY payloads, the router's route table)
and in events stay the plain strings they always were, and a row's
``state`` compares equal to ``JobState.RUNNING`` whether it was read as a
``str`` or built as a member.

The lifecycle (``core/lifecycle.py`` decides the transitions)::

    creating -> running -> pausing -> paused -> resuming -> running
    running -> ending -> ended            running -> failed -> recovering -> running
    any -> deleting -> (row gone)

A leaf of the catalog: the router imports it (through the catalog), so it
imports nothing of jobmesh.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class JobState(StrEnum):
    """What a job is (``jobs.state``), as the controller last recorded it."""

    CREATING = "creating"      # new PGDATA being made and started
    RUNNING = "running"        # reachable by clients
    PAUSING = "pausing"        # being snapshotted to the store, then stopped
    PAUSED = "paused"          # only in the store; a client's wake resumes it
    RESUMING = "resuming"      # being restored from the store and started
    ENDING = "ending"          # like pausing, but it stays down
    ENDED = "ended"            # only in the store; no wake resumes it
    FAILED = "failed"          # its processes died; recovery follows if wanted running
    RECOVERING = "recovering"  # restoring the latest recovery point and archived WAL
    DELETING = "deleting"      # everything is being removed; then the row goes


class DesiredState(StrEnum):
    """What the operator (or a client's wake, or idle pause) wants (``jobs.desired_state``)."""

    RUNNING = "running"
    PAUSED = "paused"
    ENDED = "ended"
    DELETED = "deleted"


def settled(desired: DesiredState) -> JobState | None:
    """The state a job is in once it is what ``desired`` asks (None: its row is gone)."""
    match desired:
        case DesiredState.RUNNING:
            return JobState.RUNNING
        case DesiredState.PAUSED:
            return JobState.PAUSED
        case DesiredState.ENDED:
            return JobState.ENDED
        case DesiredState.DELETED:
            return None


# States in which the job holds (or is about to hold) processes on a backend.
ACTIVE: frozenset[JobState] = frozenset({
    JobState.CREATING, JobState.RUNNING, JobState.PAUSING, JobState.RESUMING,
    JobState.ENDING, JobState.RECOVERING,
})

# What a grant allows (``grants.access``); it picks the backend role a router
# logs in as. The router's route file speaks the same words.
Access = Literal["read", "write"]
ACCESS: tuple[Access, ...] = get_args(Access)
