"""What the reconciler needs from a place that runs jobs: the backend interface.

Two implementations: ``local`` (processes on this machine) and ``kubernetes``
(a pod per job). The reconciler never asks which one it has. Every method is
idempotent: the reconciler calls it again after a failure or a controller
restart, and it must then finish (or confirm) the work instead of repeating it
blindly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from jobmesh.agent.manifest import Manifest

from ..catalog.models import Job

# Reports what a long step is doing ("restoring 120 MB"); routers show it to waiting clients.
Progress = Callable[[str], Awaitable[None]]


class BackendError(Exception):
    """A backend operation failed; the message says what, for the events and the log."""


class PermanentError(BackendError):
    """A failure that retrying cannot fix (a dump that does not load, a snapshot that does
    not exist, a bad spec): the reconciler stops retrying and shows it at once."""


@dataclass(frozen=True)
class Started:
    """A job's instance is up and accepts connections from routers."""

    host: str
    port: int
    agent_url: str | None
    bytes_moved: int = 0  # bytes restored from the store (0 when adopted or created)
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stopped:
    """A job's instance is stopped and its snapshot is in the store."""

    manifest: Manifest        # the snapshot's manifest, as stored
    bytes_moved: int = 0      # bytes uploaded


class Backend(Protocol):
    name: str

    async def start(self, on_change: Callable[[str], None] | None = None) -> None:
        """Get ready. ``on_change(job_id)``: call it when the backend sees something happen
        to a job's instance (a pod failed, was evicted or vanished), so the reconciler looks
        at the job at once instead of at its next health check."""

    async def close(self) -> None:
        """Release our resources; running instances keep running."""

    async def create(self, job: Job, progress: Progress) -> Started:
        """A new instance for ``job`` from the template snapshot (or ``job.spec['source']``:
        ``{"dump": PATH}`` to load a pg_dump file). Idempotent: an instance already
        running for the job is adopted."""
        ...

    async def resume(self, job: Job, progress: Progress) -> Started:
        """Restore the job's latest snapshot (replaying archived WAL after it) and start.
        Idempotent: an instance already running for the job is adopted. Also used
        for crash recovery: anything left locally is discarded first."""
        ...

    async def recover(self, job: Job, progress: Progress) -> Started:
        """Like ``resume``, for a job whose instance died: ship what WAL can still be
        shipped, discard the local remains, restore, start."""
        ...

    async def pause(self, job: Job) -> Stopped:
        """Snapshot through the agent (it stops Postgres cleanly first), then stop the
        agent and free the job's processes. Nothing local is deleted (or kept as a warm
        copy) before the snapshot's manifest is stored."""
        ...

    async def alive(self, job: Job) -> bool | None:
        """Is the job's Postgres running (None: cannot tell right now)?"""
        ...

    async def delete(self, job: Job) -> None:
        """Stop everything of the job (no snapshot) and delete its local data and its
        objects in the store."""
        ...

    async def orphans(self, known: set[str]) -> list[str]:
        """Job ids with instances here that are not in ``known`` (stopped by the caller
        through ``stop_orphan``)."""
        ...

    async def stop_orphan(self, job_id: str) -> None:
        """Stop an instance the catalog does not know, cleanly, keeping its data."""
        ...
