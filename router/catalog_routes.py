"""The catalog as a route source: jobs, users and grants in memory, kept fresh by NOTIFY.

Every connection asks who a user is and where a job runs, so the answers
come from memory. At start the router LISTENs on ``jobmesh_jobs`` and
``jobmesh_principals`` and *then* loads every job and principal, so no
change slips between the two. Each NOTIFY names one row; one task re-reads
the named rows in turn (a single reader, so an older read never overwrites
a newer one). When the LISTEN connection is lost (or a ping on it fails)
the task reconnects with backoff and reloads everything: nothing is
announced while nobody listens. A full reload also runs every
``RESYNC_INTERVAL`` seconds as a backstop, and on SIGHUP.

While the catalog is unreachable the cache keeps serving jobs already known:
a running job is still routed; what needs the catalog (a wake, a job the
cache has not seen) gets 57P03 rather than a hang.

A grant's access picks the backend role (``job_owner`` / ``job_reader``);
both log in with the job's ``backend_password`` to ``job_<id>`` at the
address the catalog has while the job runs.

At ~400 lines it is one cache and the one task that keeps it fresh, read
together (LISTEN first, then load, then re-read what NOTIFY names).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import asyncpg

from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import (
    JOBS_CHANNEL,
    PRINCIPALS_CHANNEL,
    CatalogError,
    Job,
    PrincipalRow,
)
from jobmesh.controller.catalog.states import Access, DesiredState, JobState
from jobmesh.errors import one_line

from . import errors
from .credentials import InvalidVerifier, parse_verifier
from .metrics import RouterMetrics
from .route_source import Notice
from .routes import POOL_MODES, JobRoute, PoolMode, Principal
from .wake import Wakes, assess

log = logging.getLogger(__name__)

ROLES: dict[Access, str] = {"write": "job_owner", "read": "job_reader"}
# What a lost or refused catalog connection raises (TimeoutError: our own deadlines).
CATALOG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
CONNECT_TIMEOUT = 10.0  # connecting and loading everything
QUERY_TIMEOUT = 10.0
PING_INTERVAL = 10.0  # a LISTEN connection that died silently is found within this
# Rows of jobs being woken are also re-read this often: not every change is announced
# (a failed attempt that repeats the same error changes only ``attempts``).
WAKE_POLL_INTERVAL = 1.0
RESYNC_INTERVAL = 300.0
BACKOFF = (0.1, 10.0)  # reconnect delay: first, most


class CatalogConfigError(ValueError):
    """The DSN itself is wrong: retrying cannot help."""


@dataclass(frozen=True, slots=True)
class CachedJob:
    """A job's catalog row, with its backend routes ready while it runs."""

    row: Job
    routes: dict[Access, JobRoute] | None

    @property
    def max_connections(self) -> int | None:
        """The spec's client limit, across every router (leases.py); None: no limit."""
        limit = self.row.spec.get("max_connections")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return None
        return limit

    @property
    def job_id(self) -> str:
        return self.row.id

    @property
    def pool_mode(self) -> PoolMode:
        mode = self.row.spec.get("pool_mode")
        return "transaction" if mode == "transaction" else "session"

    @classmethod
    def of(cls, row: Job) -> CachedJob:
        return cls(row, routes_for(row) if row.state == JobState.RUNNING else None)


def routes_for(row: Job) -> dict[Access, JobRoute] | None:
    if not (row.host and row.port):
        return None
    mode, size = row.spec.get("pool_mode", "session"), row.spec.get("pool_size")
    if mode not in POOL_MODES:  # (the API checks specs; a row written otherwise is not trusted)
        mode = "session"
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        size = None
    return {access: JobRoute(row.id, row.host, row.port, row.database, role,
                             row.backend_password, None, mode, size)
            for access, role in ROLES.items()}


def principal_from(row: PrincipalRow) -> Principal | None:
    try:
        verifier = parse_verifier(row.verifier)
    except InvalidVerifier as exc:
        log.warning("catalog: user %s has an unusable verifier (%s); nobody can log in as it",
                    row.name, exc)
        return None
    grants = tuple((g.pattern, g.access) for g in row.grants)
    return Principal(row.name, verifier, grants, row.admin, row.stats)


class CatalogRoutes:
    """A route source backed by the catalog (see ``route_source.RouteSource``)."""

    def __init__(self, catalog: Catalog, metrics: RouterMetrics, *, wake_timeout: float) -> None:
        self._catalog = catalog
        self.catalog = catalog  # (for the leases of per-job client limits)
        self._metrics = metrics
        self.jobs: dict[str, CachedJob] = {}
        self.users: dict[str, Principal] = {}
        self.loaded = False  # the cache has been filled once
        self.synced = False  # ... and follows the catalog now
        self._dirty_jobs: set[str] = set()
        self._dirty_users: set[str] = set()
        self._resync_wanted = False
        self._lost = False
        self._wakeup = asyncio.Event()
        self._first_try = asyncio.Event()
        self._config_error: Exception | None = None
        self._task: asyncio.Task[None] | None = None
        self._nudges: dict[str, asyncio.Task[None]] = {}
        self._reports: dict[str, asyncio.Task[None]] = {}
        self._wakes = Wakes(self._request_wake, metrics, wake_timeout)

    @classmethod
    async def open(cls, dsn: str, metrics: RouterMetrics, *, wake_timeout: float) -> CatalogRoutes:
        """Connect lazily (no connection is made until used) and follow the catalog.

        Returns once the first load succeeded or failed; after a failure the
        router serves 57P03 and keeps trying. Raises CatalogConfigError for a
        DSN that cannot work.
        """
        catalog = await Catalog.connect(dsn, min_size=0, max_size=4)
        routes = cls(catalog, metrics, wake_timeout=wake_timeout)
        routes._task = asyncio.get_running_loop().create_task(routes._follow_catalog())
        await routes._first_try.wait()
        if routes._config_error is not None:
            await routes.close()
            raise CatalogConfigError(str(routes._config_error))
        return routes

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self._catalog.close(), QUERY_TIMEOUT)
        except TimeoutError:
            self._catalog.pool.terminate()  # a query hung on a dead catalog connection

    def resync(self) -> None:
        """Reload everything soon (SIGHUP)."""
        self._resync_wanted = True
        self._wakeup.set()

    # --- the route source --------------------------------------------------------------

    def user(self, name: str) -> Principal | None:
        if not self.loaded:
            raise errors.catalog_unavailable()
        return self.users.get(name)

    def job(self, job_id: str) -> CachedJob | None:
        entry = self.jobs.get(job_id)
        if entry is None and not self.synced:
            raise errors.catalog_unavailable()  # it may have been created since
        return entry

    def route(self, job_id: str, access: Access) -> JobRoute | None:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise errors.unknown_job(job_id)
        desired = entry.row.desired_state
        if entry.routes is not None and desired in (DesiredState.RUNNING, DesiredState.PAUSED):
            if desired == DesiredState.PAUSED:
                self._nudge(job_id)  # about to be paused, but a client wants it
            return entry.routes[access]
        assess(job_id, entry.row)  # raises when it will not come up
        return None

    async def look_again(self, job_id: str) -> CachedJob | None:
        """A client asked for a job we do not know: read its row (a create's NOTIFY may
        still be on its way), so a client connecting right after a create is not told 3D000."""
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                row = await self._catalog.job(job_id)
        except CATALOG_ERRORS as exc:
            log.warning("catalog: cannot look up job %s: %s", job_id, one_line(exc))
            raise errors.catalog_unavailable() from exc
        if row is not None:
            self._apply_job(job_id, row)
        return self.jobs.get(job_id)

    async def wake(self, job_id: str, access: Access, notice: Notice) -> JobRoute:
        entry = self.jobs.get(job_id)
        if entry is None:
            raise errors.unknown_job(job_id)
        row = await self._wakes.until_running(entry.row, notice)
        routes = routes_for(row)
        assert routes is not None  # until_running returns running rows with an address
        return routes[access]

    async def report(self, router: str, listen: str, clients: dict[str, int],
                     touch: list[str], ttl: float) -> None:
        """This router's clients per job (``activity.py``), its heartbeat in the catalog."""
        await self._catalog.report_activity(router, listen, clients, touch, ttl)

    def unreachable(self, job_id: str) -> bool:
        """Tell the controller (NOTIFY) so its health check looks at the job now rather
        than at its next round; one report in flight per job."""
        if job_id not in self._reports:
            async def report() -> None:
                try:
                    async with asyncio.timeout(QUERY_TIMEOUT):
                        await self._catalog.report_unreachable(job_id)
                except CATALOG_ERRORS as exc:  # the health check finds it all the same
                    log.warning("catalog: cannot report job %s unreachable: %s", job_id,
                                one_line(exc))
                finally:
                    del self._reports[job_id]

            self._reports[job_id] = asyncio.get_running_loop().create_task(report())
        return True

    # --- following the catalog -----------------------------------------------------------

    async def _request_wake(self, job_id: str) -> Job | None:
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                return await self._catalog.request_wake(job_id)
        except CATALOG_ERRORS as exc:
            log.warning("catalog: cannot request a wake of job %s: %s", job_id, one_line(exc))
            raise errors.catalog_unavailable() from exc

    async def want(self, job_id: str, desired: str, actor: str | None = None) -> None:
        """The admin console's SNAPSHOT_STOP ("paused") and WAKE ("running"), as ``actor``
        (the admin principal) asked; the catalog's functions for routers do them."""
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                if desired == "running":
                    await self._catalog.request_wake(job_id)
                else:
                    await self._catalog.request_pause(job_id, actor)
        except CATALOG_ERRORS as exc:
            log.warning("catalog: cannot want job %s %s: %s", job_id, desired, one_line(exc))
            raise errors.catalog_unavailable() from exc
        except CatalogError as exc:  # no such job (any more), or it is being deleted
            raise errors.ClientError("55000", one_line(exc)) from exc

    def _nudge(self, job_id: str) -> None:
        """Ask for the job to stay running, in the background (the client is served now)."""
        if job_id in self._nudges:
            return

        async def nudge() -> None:
            try:
                with contextlib.suppress(errors.ClientError):
                    await self._request_wake(job_id)
            finally:
                del self._nudges[job_id]

        self._nudges[job_id] = asyncio.get_running_loop().create_task(nudge())

    def _job_changed(self, job_id: str) -> None:
        self._dirty_jobs.add(job_id)
        self._wakeup.set()

    def _user_changed(self, name: str) -> None:
        self._dirty_users.add(name)
        self._wakeup.set()

    def _connection_lost(self) -> None:
        self._lost = True
        self._wakeup.set()

    async def _follow_catalog(self) -> None:
        delay = BACKOFF[0]
        while True:
            conn: asyncpg.Connection | None = None
            self._lost = False
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    conn = await self._catalog.listen(
                        {JOBS_CHANNEL: self._job_changed, PRINCIPALS_CHANNEL: self._user_changed},
                        on_lost=self._connection_lost,
                    )
                    await self._load_all()
                self._set_synced(True)
                delay = BACKOFF[0]
                self._first_try.set()
                await self._follow(conn)
                log.warning("catalog: LISTEN connection lost; reconnecting")
            except (ValueError, asyncpg.ClientConfigurationError) as exc:
                self._config_error = exc  # open() reports it
                self._first_try.set()
                return
            except CATALOG_ERRORS as exc:
                log.warning("catalog: unreachable (%s); retrying in %.1fs", one_line(exc), delay)
            except Exception:  # a bug; following the catalog must not stop for good
                log.exception("catalog: unexpected error; reconnecting in %.1fs", delay)
            finally:
                self._set_synced(False)
                self._first_try.set()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)  # backoff before reconnecting
            delay = min(delay * 2, BACKOFF[1])

    async def _follow(self, conn: asyncpg.Connection) -> None:
        """Apply changes as they are announced, until the connection is lost."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + RESYNC_INTERVAL
        next_ping = loop.time() + PING_INTERVAL
        while True:
            self._wakeup.clear()
            if self._lost:
                return
            if self._resync_wanted or loop.time() >= next_resync:
                asked, self._resync_wanted = self._resync_wanted, False
                async with asyncio.timeout(QUERY_TIMEOUT):
                    await self._load_all(logging.INFO if asked else logging.DEBUG)
                next_resync = loop.time() + RESYNC_INTERVAL
            elif self._dirty_jobs or self._dirty_users:
                await self._refresh_dirty()
            else:
                waking = self._wakes.job_ids()
                until = min(next_ping, loop.time() + WAKE_POLL_INTERVAL) if waking else next_ping
                try:
                    async with asyncio.timeout_at(until):
                        await self._wakeup.wait()
                except TimeoutError:
                    self._dirty_jobs.update(waking)
                    if loop.time() >= next_ping:
                        async with asyncio.timeout(QUERY_TIMEOUT):
                            await conn.fetchval("SELECT 1")
                        next_ping = loop.time() + PING_INTERVAL

    async def _refresh_dirty(self) -> None:
        job_ids, self._dirty_jobs = self._dirty_jobs, set()
        names, self._dirty_users = self._dirty_users, set()
        for job_id in sorted(job_ids):
            async with asyncio.timeout(QUERY_TIMEOUT):
                row = await self._catalog.job(job_id)
            self._apply_job(job_id, row)
        for name in sorted(names):
            async with asyncio.timeout(QUERY_TIMEOUT):
                rows = await self._catalog.principals(name)
            self._apply_user(name, rows[0] if rows else None)

    async def _load_all(self, level: int = logging.INFO) -> None:
        self._dirty_jobs.clear()  # the full read covers what was announced until now
        self._dirty_users.clear()
        rows = await self._catalog.jobs()
        principals = await self._catalog.principals()
        gone = set(self.jobs) - {r.id for r in rows}
        self.jobs = {r.id: CachedJob.of(r) for r in rows}
        self.users = {p.name: u for p in principals if (u := principal_from(p)) is not None}
        self.loaded = True
        for job_id in gone:
            self._wakes.changed(job_id, None)
        for job_id, entry in self.jobs.items():
            self._wakes.changed(job_id, entry.row)
        log.log(level, "catalog: loaded %d jobs, %d users", len(self.jobs), len(self.users))

    def _apply_job(self, job_id: str, row: Job | None) -> None:
        if row is None:
            self.jobs.pop(job_id, None)
            log.debug("catalog: job %s is gone", job_id)
        else:
            self.jobs[job_id] = CachedJob.of(row)
            log.debug("catalog: job %s is %s (wanted %s)", job_id, row.state, row.desired_state)
        self._wakes.changed(job_id, row)

    def _apply_user(self, name: str, row: PrincipalRow | None) -> None:
        principal = principal_from(row) if row is not None else None
        if principal is None:
            self.users.pop(name, None)
            log.info("catalog: user %s removed", name)
        else:
            self.users[name] = principal
            log.info("catalog: user %s updated (%d grants%s)", name, len(principal.grants),
                     ", admin" if principal.admin else "")

    def _set_synced(self, synced: bool) -> None:
        self.synced = synced
        self._metrics.catalog_synced.set(1 if synced else 0)
