"""Jobs on a real local backend for a test: made in the catalog, removed afterwards.

``making_jobs`` hands a test a function that makes catalog jobs; when the test
ends (also when it failed) each job is deleted from the backend, and whatever of
it still runs (its PostgreSQL, its agent, a restore) is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from jobmesh.controller.backends.local.backend import LocalBackend
from jobmesh.controller.backends.local.process import JobDir, kill_leftovers
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import Job
from jobmesh.controller.core.backend import BackendError
from tests.support.mesh import pids_mentioning

MakeJob = Callable[..., Awaitable[Job]]


@contextlib.asynccontextmanager
async def making_jobs(backend: LocalBackend, catalog: Catalog,
                      prefix: str) -> AsyncIterator[MakeJob]:
    made: list[Job] = []

    async def make(spec: dict[str, Any] | None = None, job_id: str | None = None) -> Job:
        job = await catalog.create_job(job_id or f"{prefix}-{os.urandom(3).hex()}", spec)
        made.append(job)
        return job

    try:
        yield make
    finally:
        for job in made:
            with contextlib.suppress(BackendError):
                await backend.delete(job)
            jd = JobDir(backend.root, job.id)
            await kill_leftovers(jd.pgdata)
            for pid in pids_mentioning(str(jd.path)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
