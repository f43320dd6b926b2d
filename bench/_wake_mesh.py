"""The mesh bench/wake.py measures, made of real processes, and the client that times it.

A catalog PostgreSQL (default settings, as ``jobmesh up`` runs it), ``jobmesh
controller`` (local backend, file:// store, ``--idle-timeout 0``) and ``jobmesh
router --catalog-dsn``, each a subprocess logging to a file under the state
directory. ``start_mesh`` registers the teardown on the ExitStack it is given:
the controller leaves job instances running when it stops, so the teardown also
stops every PostgreSQL under ``jobs/`` (``pg_ctl stop -m immediate``) and kills
whatever process still names the state directory on its command line (agents),
with tests/support's own helpers (the process harness is the test suite's).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
from _peers import REPO, BenchError

sys.path.insert(0, str(REPO))  # for tests.support: the benches reuse the suite's harness
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import JOBS_CHANNEL, Event, Job
from tests.support.mesh import kill_processes_mentioning, stop_pgdata
from tests.support.process import LoggedProcess

CATALOG_PASSWORD = "catalog-pw"
CATALOG_DB = "jobmesh"
USER, PASSWORD = "bench", "bench-pw"  # write access on every job (maps to job_owner)


@dataclass
class Mesh:
    state: Path  # the controller's --state-dir
    catalog_dsn: str
    router_port: int = 0
    api_port: int = 0  # the controller's API and status page
    controller: LoggedProcess | None = None
    router: LoggedProcess | None = None

    @property
    def store_url(self) -> str:
        return f"file://{self.state / 'store'}"

    def pgdata(self, job_id: str) -> Path:
        return self.state / "jobs" / job_id / "pgdata"

    def dsn(self, job_id: str) -> str:
        return (f"postgresql://{quote(USER)}:{quote(PASSWORD)}@127.0.0.1:{self.router_port}"
                f"/job_{job_id}")

    def stop(self) -> None:
        """Router, controller, then every job instance and agent the controller left."""
        for p in (self.router, self.controller):
            if p is not None:
                p.stop()
        for pgdata in self.state.glob("jobs/*/pgdata"):
            stop_pgdata(pgdata)
        kill_processes_mentioning(str(self.state) + "/")

    def spares_ready(self, wanted: int = 2) -> bool:
        """The template's spare copies are all made (none being copied)."""
        for spares in self.state.glob("template/*/spares"):
            names = [p.name for p in spares.iterdir()]
            return len([n for n in names if not n.startswith(".")]) >= wanted and all(
                not n.startswith(".") for n in names)
        return False


def start_catalog(stack: contextlib.ExitStack, root: Path) -> tuple[Instance, str]:
    """The catalog's PostgreSQL with its default settings (fsync on), as ``jobmesh up``."""
    inst = Instance(root / "catalog", port=free_port())
    inst.initdb(superuser_password=CATALOG_PASSWORD)
    stack.callback(inst.stop_quietly)
    inst.start()
    inst.psql(f"CREATE DATABASE {CATALOG_DB}")
    return inst, f"postgresql://postgres:{CATALOG_PASSWORD}@127.0.0.1:{inst.port}/{CATALOG_DB}"


def start_mesh(stack: contextlib.ExitStack, state: Path, catalog_dsn: str,
               wake_timeout: float, controller_args: tuple[str, ...] = ()) -> Mesh:
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    mesh = Mesh(state, catalog_dsn, api_port=free_port())
    stack.callback(mesh.stop)
    mesh.controller = LoggedProcess("controller", [
        sys.executable, "-m", "jobmesh", "controller", "--catalog-dsn", catalog_dsn,
        "--state-dir", str(state), "--api-listen", f"127.0.0.1:{mesh.api_port}",
        "--idle-timeout", "0", *controller_args], state / "jobmesh.controller.log", cwd=REPO,
        failure=BenchError)
    mesh.controller.wait_for_log(r"controller API listening on", timeout=120)
    mesh.router = LoggedProcess("router", [
        sys.executable, "-m", "jobmesh", "router", "--listen", "127.0.0.1:0",
        "--catalog-dsn", catalog_dsn, "--wake-timeout", f"{wake_timeout:g}"],
        state / "jobmesh.router.log", cwd=REPO, failure=BenchError)
    m = mesh.router.wait_for_log(r"router listening on [\d.]+:(\d+)", timeout=120)
    mesh.router_port = int(m.group(1))
    return mesh


# --- the catalog, as an operator's API call would use it -----------------------------------


async def wait_state(catalog: Catalog, job_id: str, state: str | None,
                     timeout: float = 600) -> Job | None:
    """Until the job's state is ``state`` (None: until its row is gone), on NOTIFY."""
    changed = asyncio.Event()
    conn = await catalog.listen({JOBS_CHANNEL: lambda p: p == job_id and changed.set()})
    try:
        async with asyncio.timeout(timeout):
            while True:
                changed.clear()
                job = await catalog.job(job_id)
                if (job.state if job else None) == state:
                    return job
                if job is not None and job.error and job.attempts >= 3:
                    raise BenchError(f"job {job_id} is stuck in {job.state}: {job.error}")
                await changed.wait()
    except TimeoutError:
        raise BenchError(f"job {job_id} did not reach {state or 'deletion'} within "
                         f"{timeout:g} s: {await catalog.job(job_id)}") from None
    finally:
        await conn.close()


async def last_event_id(catalog: Catalog) -> int:
    return int(await catalog.pool.fetchval("SELECT COALESCE(max(id), 0) FROM events"))


async def events_since(catalog: Catalog, job_id: str, after: int) -> list[Event]:
    return [e for e in await catalog.events(job_id, limit=200) if e.id > after]


async def pause(catalog: Catalog, job_id: str) -> dict[str, Any]:
    before = await last_event_id(catalog)
    started = time.perf_counter()
    await catalog.set_desired(job_id, "paused")
    await wait_state(catalog, job_id, "paused", timeout=1800)
    paused = transition(await events_since(catalog, job_id, before), "paused")
    return {"ms": round((time.perf_counter() - started) * 1000, 1),
            "controller_ms": paused.duration_ms if paused else None,
            "stored_bytes": paused.bytes if paused else None}


def transition(events: list[Event], to_state: str) -> Event | None:
    found = [e for e in events if e.kind == "transition" and e.to_state == to_state]
    return found[-1] if found else None


# --- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstRow:
    ms: float        # connect() start to the first row
    started: float   # wall clock (time.time()) at connect() start, to line up with events
    started_perf: float  # perf_counter() at connect() start
    retries: int = 0

    @property
    def done_perf(self) -> float:
        return self.started_perf + self.ms / 1000


async def first_row(dsn: str, sql: str, *, timeout: float = 600,
                    retry_unknown: bool = False) -> FirstRow:
    """Connect (asyncpg), run ``sql``, close; the time from connect() to its first row.

    ``retry_unknown``: a job created a moment ago may not be in the router's cache yet
    (it hears of it by NOTIFY); its 3D000 is retried every 2 ms, and counted.
    """
    started_wall, started = time.time(), time.perf_counter()
    retries = 0
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=timeout)
            break
        except asyncpg.InvalidCatalogNameError:
            if not retry_unknown or time.perf_counter() - started > 30:
                raise
            retries += 1
            await asyncio.sleep(0.002)
    try:
        if await conn.fetchrow(sql) is None:
            raise BenchError(f"{sql!r} returned no row")
        ms = (time.perf_counter() - started) * 1000
    finally:
        await conn.close()
    return FirstRow(ms, started_wall, started, retries)


async def poll_first_row(*, host: str, port: int, user: str, password: str, database: str,
                         sql: str, timeout: float = 600) -> float:
    """Connect to a PostgreSQL that is starting (refused, then 57P03 until it accepts), every
    5 ms, and run ``sql``; returns when the first row arrived (perf_counter seconds)."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            conn = await asyncpg.connect(host=host, port=port, user=user, password=password,
                                         database=database, timeout=10)
            break
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if time.perf_counter() > deadline:
                raise BenchError(f"PostgreSQL on port {port} did not accept connections "
                                 f"within {timeout:g} s: {exc}") from exc
            await asyncio.sleep(0.005)
    try:
        if await conn.fetchrow(sql) is None:
            raise BenchError(f"{sql!r} returned no row")
        return time.perf_counter()
    finally:
        await conn.close()


def event_at(e: Event | None, since: float) -> float | None:
    """Milliseconds from ``since`` (wall clock) to the event."""
    return None if e is None else round((e.at.timestamp() - since) * 1000, 1)


def laps_of(e: Event | None) -> dict[str, Any]:
    return dict((e.detail or {}).get("timings_ms") or {}) if e is not None else {}
