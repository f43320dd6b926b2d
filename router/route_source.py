"""What the server asks about jobs and users, whoever answers.

Two sources implement it: the static route file (``routes.RouteTable``,
every job always running) and the catalog (``catalog_routes.CatalogRoutes``,
jobs come and go, sleep and wake). The server asks in a fixed order, so that
nothing is revealed, and no job woken, before the client has proved who it is:

1. ``user(name)``: the principal (verifier and grants), before SCRAM;
2. ``job(job_id)``: does the job exist (else 3D000); then the principal's
   grant (else 42501);
3. ``route(job_id, access)``: the backend to log in to now, or None when the
   job must be woken first (it raises ClientError when it will not be);
4. ``wake(...)``: after AuthenticationOk, wait for the job to run, passing
   progress to ``notice`` for the client.

Lookups 1-3 are synchronous and answered from memory: they run on every
connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from jobmesh.controller.catalog.states import Access

from .routes import JobRoute, PoolMode, Principal

# Sends one line of progress to a waiting client (as a NoticeResponse).
Notice = Callable[[str], None]


class KnownJob(Protocol):
    """What the server needs of a job before routing it."""

    @property
    def job_id(self) -> str: ...

    @property
    def max_connections(self) -> int | None: ...

    @property
    def pool_mode(self) -> PoolMode: ...


class RouteSource(Protocol):
    def user(self, name: str) -> Principal | None:
        """The principal named ``name``, or None (the client then fails SCRAM as usual)."""
        ...

    def job(self, job_id: str) -> KnownJob | None:
        """The job, or None when there is no such job."""
        ...

    def route(self, job_id: str, access: Access) -> JobRoute | None:
        """The backend to log in to for ``access``, or None when the job must be woken."""
        ...

    async def look_again(self, job_id: str) -> KnownJob | None:
        """``job`` found nothing: ask the source itself, in case the job was created a
        moment ago and its announcement has not arrived yet."""
        ...

    async def wake(self, job_id: str, access: Access, notice: Notice) -> JobRoute:
        """Wake the job (once, however many clients wait) and return its route when it runs."""
        ...

    def unreachable(self, job_id: str) -> bool:
        """The job's route did not answer: have it looked at now (in the background).
        True when someone will bring it back, so that its clients are worth holding."""
        ...
