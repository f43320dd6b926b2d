"""What the catalog holds, as values: jobs, principals and grants, events; and the names it accepts.

Pure: no database here. ``db.py`` turns rows into these; the router, the
API and the backends read them. A row's strings with a fixed vocabulary
(states, access) become the enums of ``states.py`` as the row is read, so
code past this point never compares against a misspelt literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from jobmesh import jobids

from .states import ACCESS, Access, DesiredState, JobState

# NOTIFY channels (triggers in the migrations announce on them); the payload
# names one row: a job's id, a principal's name.
JOBS_CHANNEL = "jobmesh_jobs"
PRINCIPALS_CHANNEL = "jobmesh_principals"
# A router found a running job's PostgreSQL not answering (payload: the job id).
CHECK_CHANNEL = "jobmesh_check"

JOB_ID = jobids.JOB_ID  # the one rule (jobmesh/jobids.py); the backends scan with it
PRINCIPAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}")
PATTERN = re.compile(r"[a-z0-9_*?\[\]-]{1,63}")


class Row(Protocol):
    """A row by column name: an asyncpg Record, or a dict in tests."""

    def __getitem__(self, column: str, /) -> Any: ...


class CatalogError(Exception):
    """A request the catalog refuses; the message says why, for the user."""


class NotFound(CatalogError):
    pass


class Conflict(CatalogError):
    pass


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    desired_state: DesiredState
    host: str | None
    port: int | None
    agent_url: str | None
    backend_password: str
    spec: dict[str, Any]
    progress: str | None
    error: str | None
    attempts: int
    last_active: datetime
    created_at: datetime
    updated_at: datetime
    # When the failed transition is tried again (None: no retry due), and whether the
    # controller gave up on it (``error`` is a failure retrying cannot fix: it waits for
    # the user to retry, want something else, or delete the job).
    next_attempt_at: datetime | None = None
    gave_up: bool = False
    # The newest incarnation's generation (``agent/fence.py``): 0 until the job first runs.
    generation: int = 0

    @classmethod
    def from_row(cls, row: Row) -> Job:
        """A ``jobs`` row."""
        return cls(
            id=row["id"], state=JobState(row["state"]),
            desired_state=DesiredState(row["desired_state"]), host=row["host"],
            port=row["port"], agent_url=row["agent_url"],
            backend_password=row["backend_password"], spec=row["spec"],
            progress=row["progress"], error=row["error"], attempts=row["attempts"],
            last_active=row["last_active"], created_at=row["created_at"],
            updated_at=row["updated_at"],
            next_attempt_at=_added(row, "next_attempt_at", None),
            gave_up=_added(row, "gave_up", False),
            generation=_added(row, "generation", 0))

    @property
    def database(self) -> str:
        return f"job_{self.id}"

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the backend password."""
        return {
            "id": self.id, "state": self.state, "desired_state": self.desired_state,
            "host": self.host, "port": self.port, "agent_url": self.agent_url,
            "spec": self.spec, "progress": self.progress, "error": self.error,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at
            else None,
            "gave_up": self.gave_up, "generation": self.generation,
            "last_active": self.last_active.isoformat(),
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
        }


def _added(row: Row, column: str, default: Any) -> Any:
    """A column a later migration added: routers of a new release may read a catalog
    that the (older) controller has not migrated yet, during a rolling upgrade."""
    try:
        return row[column]
    except KeyError:
        return default


@dataclass(frozen=True)
class Grant:
    pattern: str
    access: Access


@dataclass(frozen=True)
class PrincipalRow:
    name: str
    verifier: str
    admin: bool
    grants: tuple[Grant, ...]
    stats: bool = False  # the admin console's SHOW commands only (PgBouncer's stats_users)


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str | None  # None: an event of the mesh (a login, say)
    at: datetime
    kind: str
    # Plain text: besides the job states, an event may name "deleted" (the row went).
    from_state: str | None
    to_state: str | None
    duration_ms: float | None
    bytes: int | None
    detail: dict[str, Any]
    actor: str | None = None  # who asked: a principal's name (None: the mesh itself)

    @classmethod
    def from_row(cls, row: Row) -> Event:
        """An ``events`` row."""
        return cls(
            id=row["id"], job_id=row["job_id"], at=row["at"], kind=row["kind"],
            from_state=row["from_state"], to_state=row["to_state"],
            duration_ms=row["duration_ms"], bytes=row["bytes"], detail=row["detail"],
            actor=_added(row, "actor", None))

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "job_id": self.job_id, "at": self.at.isoformat(),
                "kind": self.kind, "from_state": self.from_state, "to_state": self.to_state,
                "duration_ms": self.duration_ms, "bytes": self.bytes, "detail": self.detail,
                "actor": self.actor}


def check_job_id(job_id: str) -> None:
    """CatalogError ``bad job id 'X': <why>``; the rule itself is the API's hint
    (``jobids.RULE``), so the two never say it twice."""
    why = jobids.why_not(job_id)
    if why is not None:
        raise CatalogError(f"bad job id {job_id!r}: {why}")


def check_principal(name: str) -> None:
    if not PRINCIPAL.fullmatch(name):
        raise CatalogError(f"bad user name {name!r}: use letters, digits, '_', '.', '@' "
                           "and '-', at most 63 characters")


def check_pattern(pattern: str) -> None:
    if not PATTERN.fullmatch(pattern):
        raise CatalogError(f"bad job pattern {pattern!r}: a job id or a glob such as "
                           "'scrape-*' or '*'")


def check_access(access: str) -> Access:
    """``access`` as a grant's access; CatalogError unless it is read or write."""
    for known in ACCESS:
        if access == known:
            return known
    raise CatalogError("access must be read or write")
