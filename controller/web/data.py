"""What the status page shows, read from the catalog: the overview and a job's page.

Every figure comes from the catalog, so every controller replica shows the same
page: job rows and their events, the routers' reports (``router_reports``:
clients per job, and each router's heartbeat), snapshots. The one exception is
store usage, which only a listing of the store tells: it is surveyed in the
background at most once a ``StoreUsage.every`` and shown with its age.

A page is a few indexed queries whatever the number of jobs: the counts are one
aggregate, and only the listed page's rows (``summary.PAGE_SIZE``) are read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from jobmesh.errors import one_line

from ..catalog.db import Catalog
from ..catalog.models import Event, Job
from ..storage.gc import StoreSurvey
from ..storage.keeper import Keeper
from .summary import PAGE_SIZE, ListQuery, Pages, SortKey, WakeStats

log = logging.getLogger("jobmesh.controller.web")

# A wake: from what asked for it (a router's wake request, or an operator's resume) to
# the job running again, for the wakes that ended in the last hour.
_WAKES = """
SELECT extract(epoch FROM t.at - r.at) AS seconds
FROM events t
JOIN LATERAL (SELECT e.at FROM events e
              WHERE e.job_id = t.job_id AND e.id < t.id
                AND (e.kind = 'wake-requested'
                     OR (e.kind = 'desired' AND e.detail->>'desired_state' = 'running'))
              ORDER BY e.id DESC LIMIT 1) r ON true
WHERE t.kind = 'transition' AND t.from_state = 'resuming' AND t.to_state = 'running'
  AND t.at > now() - interval '1 hour'
"""

_CLIENTS = """
SELECT c.key AS job_id, sum(c.value::int)::int AS clients
FROM router_reports r, jsonb_each_text(r.clients) c
WHERE r.seen_at > now() - make_interval(secs => r.ttl) {where}
GROUP BY c.key
"""


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    desired_state: str
    since: datetime | None  # when it entered its state
    last_active: datetime
    size_bytes: int | None  # its PGDATA at its newest snapshot
    stored_bytes: int | None  # what it holds in the store (None: not surveyed yet)
    clients: int
    error: str | None
    gave_up: bool
    progress: str | None


@dataclass(frozen=True)
class RouterRow:
    id: str
    listen: str
    clients: int
    seen_at: datetime
    live: bool


@dataclass(frozen=True)
class Health:
    catalog_ms: float | None  # a round trip; None: the catalog did not answer
    catalog_error: str | None
    routers: tuple[RouterRow, ...]
    controller: str  # which replica this is, and who leads


@dataclass(frozen=True)
class Failure:
    id: str
    state: str
    error: str
    gave_up: bool
    attempts: int
    at: datetime


@dataclass(frozen=True)
class Overview:
    now: datetime
    counts: dict[str, int]
    total: int
    listed: int  # jobs the filter matches
    rows: tuple[JobRow, ...]
    query: ListQuery
    pages: Pages
    wakes: WakeStats
    failures: tuple[Failure, ...]
    failing: int
    store: StoreSurvey | None
    store_age: float | None  # seconds since the survey
    store_error: str | None
    health: Health


@dataclass(frozen=True)
class JobPage:
    now: datetime
    job: Job
    row: JobRow
    events: tuple[Event, ...]
    snapshots: tuple[dict[str, Any], ...]
    grants: tuple[tuple[str, str, str], ...]  # principal, pattern, access
    wakes: WakeStats


class StoreUsage:
    """The store's survey, redone in the background when a page finds it older than
    ``every`` (a listing of the whole store: not for every page view)."""

    def __init__(self, keeper: Keeper | None, every: float = 60.0) -> None:
        self.keeper, self.every = keeper, every
        self.survey: StoreSurvey | None = None
        self.at: float | None = None
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def current(self) -> tuple[StoreSurvey | None, float | None, str | None]:
        """The last survey, its age in seconds, and the last survey's error; starts a new
        survey when due."""
        now = time.monotonic()
        if self.keeper is not None and (self._task is None or self._task.done()) and (
                self.at is None or now - self.at > self.every):
            self._task = asyncio.get_running_loop().create_task(self._survey())
        return self.survey, None if self.at is None else now - self.at, self.error

    async def _survey(self) -> None:
        assert self.keeper is not None
        try:
            self.survey, self.error = await self.keeper.survey(), None
        except Exception as exc:  # shown on the page; the next view tries again
            log.warning("cannot survey the store: %s", one_line(exc))
            self.error = one_line(exc)
        self.at = time.monotonic()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Reader:
    catalog: Catalog
    store: StoreUsage
    controller: Any = field(default=lambda: "this controller")  # () -> str

    async def overview(self, q: ListQuery) -> Overview:
        pool = self.catalog.pool
        now = await pool.fetchval("SELECT now()")
        counts = {r["state"]: r["n"] for r in await pool.fetch(
            "SELECT state, count(*)::int AS n FROM jobs GROUP BY state ORDER BY state")}
        where, args = _filter(q)
        listed = await pool.fetchval(f"SELECT count(*) FROM jobs j WHERE {where}", *args)
        pages = Pages.of(listed, q.page)
        rows = await pool.fetch(
            "SELECT j.*, s.size_bytes FROM jobs j LEFT JOIN LATERAL (SELECT size_bytes FROM"
            " snapshots WHERE job_id = j.id ORDER BY created_at DESC LIMIT 1) s ON true"
            f" WHERE {where} ORDER BY {SortKey.SQL[q.sort]}"
            f" LIMIT {PAGE_SIZE} OFFSET {pages.offset}", *args)
        survey, age, store_error = self.store.current()
        job_rows = await self._rows(rows, survey)
        failures = await pool.fetch(
            "SELECT id, state, error, gave_up, attempts, updated_at FROM jobs"
            " WHERE error IS NOT NULL OR state = 'failed' ORDER BY updated_at DESC LIMIT 10")
        failing = await pool.fetchval(
            "SELECT count(*) FROM jobs WHERE error IS NOT NULL OR state = 'failed'")
        return Overview(
            now=now, counts=counts, total=sum(counts.values()), listed=listed,
            rows=job_rows, query=q, pages=pages, wakes=await self._wakes(),
            failures=tuple(Failure(r["id"], r["state"], r["error"] or "failed", r["gave_up"],
                                   r["attempts"], r["updated_at"]) for r in failures),
            failing=failing, store=survey, store_age=age, store_error=store_error,
            health=await self._health())

    async def job_page(self, job_id: str) -> JobPage | None:
        pool = self.catalog.pool
        row = await pool.fetchrow(
            "SELECT j.*, s.size_bytes FROM jobs j LEFT JOIN LATERAL (SELECT size_bytes FROM"
            " snapshots WHERE job_id = j.id ORDER BY created_at DESC LIMIT 1) s ON true"
            " WHERE j.id = $1", job_id)
        if row is None:
            return None
        survey, _age, _error = self.store.current()
        (job_row,) = await self._rows([row], survey)
        events = await self.catalog.events(job_id, limit=200)
        grants = await pool.fetch("SELECT principal, pattern, access FROM grants"
                                  " ORDER BY principal, pattern")
        return JobPage(
            now=await pool.fetchval("SELECT now()"), job=Job.from_row(row), row=job_row,
            events=tuple(reversed(events)),
            snapshots=tuple(reversed(await self.catalog.snapshots(job_id))),
            grants=tuple((g["principal"], g["pattern"], g["access"]) for g in grants
                         if fnmatch.fnmatchcase(job_id, g["pattern"])),
            wakes=await self._wakes(job_id))

    async def _rows(self, rows: list[asyncpg.Record],
                    survey: StoreSurvey | None) -> tuple[JobRow, ...]:
        ids = [r["id"] for r in rows]
        pool = self.catalog.pool
        since = {r["id"]: r["at"] for r in await pool.fetch(
            "SELECT j.id, (SELECT max(e.at) FROM events e WHERE e.job_id = j.id"
            " AND e.kind = 'transition' AND e.to_state = j.state) AS at"
            " FROM jobs j WHERE j.id = ANY($1)", ids)}
        clients = {r["job_id"]: r["clients"] for r in await pool.fetch(
            _CLIENTS.format(where="AND c.key = ANY($1)"), ids)}
        out = []
        for r in rows:
            held = survey.jobs.get(r["id"]) if survey is not None else None
            out.append(JobRow(
                id=r["id"], state=r["state"], desired_state=r["desired_state"],
                since=since.get(r["id"]) or r["created_at"], last_active=r["last_active"],
                size_bytes=r["size_bytes"],
                stored_bytes=None if survey is None else
                (held.unique + held.wal + held.other if held else 0),
                clients=clients.get(r["id"], 0), error=r["error"], gave_up=r["gave_up"],
                progress=r["progress"]))
        return tuple(out)

    async def _wakes(self, job_id: str | None = None) -> WakeStats:
        sql = _WAKES + (" AND t.job_id = $1" if job_id else "")
        rows = await self.catalog.pool.fetch(sql, *([job_id] if job_id else []))
        return WakeStats.of([float(r["seconds"]) for r in rows])

    async def _health(self) -> Health:
        started = time.perf_counter()
        try:
            await self.catalog.pool.fetchval("SELECT 1", timeout=5)
            catalog_ms, catalog_error = (time.perf_counter() - started) * 1000, None
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            catalog_ms, catalog_error = None, one_line(exc)
        routers = await self.catalog.pool.fetch(
            "SELECT id, listen, seen_at, seen_at > now() - make_interval(secs => ttl) AS live,"
            " (SELECT coalesce(sum(value::int), 0)::int FROM jsonb_each_text(clients))"
            " AS clients FROM router_reports ORDER BY listen, id")
        return Health(catalog_ms, catalog_error,
                      tuple(RouterRow(r["id"], r["listen"], r["clients"], r["seen_at"],
                                      r["live"]) for r in routers),
                      self.controller())


def _filter(q: ListQuery) -> tuple[str, list[Any]]:
    """The SQL condition for the list's filter, and its parameters."""
    clauses: list[str] = ["true"]
    args: list[Any] = []
    if q.states:
        args.append([str(s) for s in q.states])
        clauses.append(f"j.state = ANY(${len(args)})")
    if q.search:
        args.append("%" + q.search.replace("_", "\\_") + "%")  # '_' is LIKE's wildcard
        clauses.append(f"j.id LIKE ${len(args)}")
    return " AND ".join(clauses), args
