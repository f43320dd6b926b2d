"""One lock per job, and the one way a backend's step fails: a ``BackendError`` line.

Both backends hold a job's lock for every step on it, so a reconciler that
retries, or runs two steps for one job at once, never interleaves them. And
both turn whatever a step raises into one ``BackendError`` the reconciler
records as the job's error: ours already say what failed; the errors a
backend expects (its I/O's: store, agent, API, OS) become "cannot <what>:
<why>"; anything else is a bug, so its traceback is logged and its type
named in the line. Which errors are expected, which logger gets the
tracebacks and how an error becomes a line are the backend's to say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from jobmesh.errors import one_line

from ..core.backend import BackendError


class JobLocks:
    """Per-job locks and the error wrapper of one backend."""

    def __init__(self, expected: tuple[type[Exception], ...], log: logging.Logger, *,
                 describe: Callable[[BaseException], str] = one_line) -> None:
        self.expected = expected
        self.log = log
        self.describe = describe
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def step(self, what: str, job_id: str) -> AsyncIterator[None]:
        """Holding the job's lock; failing as "cannot <what> job <id>: <why>"."""
        async with self.lock(job_id), self.errors(f"{what} job {job_id}"):
            yield

    @contextlib.asynccontextmanager
    async def errors(self, what: str) -> AsyncIterator[None]:
        """Everything fails as one BackendError line."""
        try:
            yield
        except BackendError:
            raise
        except self.expected as exc:
            raise BackendError(f"cannot {what}: {self.describe(exc)}") from exc
        except Exception as exc:  # our bugs (and errors nobody listed): still one line
            self.log.exception("cannot %s", what)
            raise BackendError(f"cannot {what}: {type(exc).__name__}: "
                               f"{self.describe(exc)}") from exc
