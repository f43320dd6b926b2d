"""A whole mesh made of real processes for end-to-end tests: controller, router, catalog.

``Mesh`` starts ``jobmesh controller`` and ``jobmesh router --catalog-dsn``
as subprocesses on a fresh catalog database, talks to the catalog directly
(as an operator's API call would), and on teardown stops everything it or
the controller started, found by the mesh's own directory on the command
line, even when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from jobmesh.agent.apitoken import header, job_token
from jobmesh.agent.postgres import bin_dir, free_port, run_pg
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import JOBS_CHANNEL, Job
from jobmesh.controller.catalog.passwords import scram_verifier
from jobmesh.controller.mesh import AGENT_KEY_FILE
from tests.support.process import LoggedProcess

ROUTER_PASSWORD = "router-pw-for-tests"  # the catalog fixture gives jobmesh_router it


def router_dsn(catalog_dsn: str) -> str:
    """The catalog as routers reach it: as jobmesh_router, the least they need."""
    parts = urlsplit(catalog_dsn)
    netloc = f"jobmesh_router:{ROUTER_PASSWORD}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Mesh:
    def __init__(self, root: Path, catalog_dsn: str, catalog: Catalog) -> None:
        self.root = root
        self.catalog_dsn = catalog_dsn
        self.catalog = catalog
        self.controller: LoggedProcess | None = None
        self.router: LoggedProcess | None = None
        self.router_port = 0
        self.api_port = 0
        self.controller_args: list[str] = []
        self.controller_env: dict[str, str] = {}  # over ours (a store's credentials)

    # --- processes ---------------------------------------------------------------------

    def start_controller(self, *extra: str) -> LoggedProcess:
        if extra:
            self.controller_args = list(extra)
        self.api_port = self.api_port or free_port()
        cmd = [sys.executable, "-m", "jobmesh", "controller", "--catalog-dsn", self.catalog_dsn,
               "--state-dir", str(self.root), "--api-listen", f"127.0.0.1:{self.api_port}",
               "--health-interval", "0.5", "--resync-interval", "5",
               *self.controller_args]
        self.controller = LoggedProcess("controller", cmd, self.root / "jobmesh.controller.log",
                                        env={**os.environ, **self.controller_env})
        self.controller.wait_for_log(r"controller API listening on")
        return self.controller

    def start_router(self, *extra: str) -> LoggedProcess:
        cmd = [sys.executable, "-m", "jobmesh", "router", "--listen", "127.0.0.1:0",
               "--catalog-dsn", router_dsn(self.catalog_dsn), "--activity-interval", "0.5",
               "--shutdown-timeout", "2", *extra]
        self.router = LoggedProcess("router", cmd, self.root / "jobmesh.router.log")
        m = self.router.wait_for_log(r"router listening on [\d.]+:(\d+)")
        self.router_port = int(m.group(1))
        return self.router

    def stop(self) -> None:
        """Stop everything of this mesh: router, controller, every job instance."""
        for p in (self.router, self.controller):
            if p is not None:
                p.stop(timeout=30)
        for pgdata in self.root.glob("jobs/*/pgdata"):
            stop_pgdata(pgdata)
        kill_processes_mentioning(str(self.root))

    # --- the catalog, as an operator would use it ---------------------------------------

    async def add_user(self, name: str, password: str, **grants: str) -> None:
        """``grants``: pattern=access, e.g. ``beta="read"``; ``star="write"`` means ``*``."""
        await self.catalog.create_principal(name, scram_verifier(password))
        for pattern, access in grants.items():
            await self.catalog.grant(name, "*" if pattern == "star" else pattern, access)

    async def wait_state(self, job_id: str, state: str, timeout: float = 90) -> Job:
        """Wait (on NOTIFY, not by sleeping) until the job's state is ``state``."""
        return await self.wait_for(job_id, lambda j: j.state == state, timeout, state)

    async def wait_for(self, job_id: str, done: Callable[[Job], bool], timeout: float = 90,
                       what: str = "the awaited condition") -> Job:
        """Wait (on NOTIFY) until ``done(job row)``."""
        changed = asyncio.Event()
        conn = await self.catalog.listen({JOBS_CHANNEL: lambda p: p == job_id and changed.set()})
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed.clear()
                    job = await self.catalog.job(job_id)
                    if job is not None and done(job):
                        return job
                    await changed.wait()
        except TimeoutError:
            job = await self.catalog.job(job_id)
            raise AssertionError(f"job {job_id} never reached {what}: {job}") from None
        finally:
            await conn.close()

    async def wait_until(self, job_id: str, check: Callable[[], Awaitable[bool]],
                         what: str, timeout: float = 90) -> None:
        """Wait until ``check()`` holds, re-checking whenever the job's row changes (NOTIFY).

        Unlike ``wait_for`` it may look at more than the row as it is now (e.g. the
        transition events), so a state the job passes through quickly is not missed."""
        changed = asyncio.Event()
        conn = await self.catalog.listen({JOBS_CHANNEL: lambda p: p == job_id and changed.set()})
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed.clear()
                    if await check():
                        return
                    await changed.wait()
        except TimeoutError:
            job = await self.catalog.job(job_id)
            raise AssertionError(f"job {job_id} never reached {what}: {job}") from None
        finally:
            await conn.close()

    async def create_job(self, job_id: str, **spec: object) -> Job:
        await self.catalog.create_job(job_id, dict(spec))
        return await self.wait_state(job_id, "running")

    async def pause(self, job_id: str) -> Job:
        await self.catalog.set_desired(job_id, "paused")
        return await self.wait_state(job_id, "paused")

    async def transitions(self, job_id: str, to_state: str) -> int:
        return sum(1 for e in await self.catalog.events(job_id, kind="transition")
                   if e.to_state == to_state)

    def agent_headers(self, job_id: str) -> dict[str, str]:
        """What the controller sends the job's agent: its token, from the state directory's
        agent key (``jobmesh.agent.apitoken``)."""
        key = (self.root / AGENT_KEY_FILE).read_text().strip().encode()
        return header(job_token(key, job_id))

    async def wait_for_base_backup(self, job_id: str, timeout: float = 90) -> dict:
        """Ask the job's agent for a base backup: it answers with the one it is taking
        (a new job's first) or takes one, when its manifest is stored."""
        job = await self.catalog.job(job_id)
        assert job is not None and job.agent_url, job
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.post(f"{job.agent_url}/base-backup",
                                         headers=self.agent_headers(job_id)) as resp:
                        if resp.status == 404 and "no agent" in await resp.text():
                            # a local job is running before its agent is: the host is
                            # told to start it after Postgres is up (put_soon)
                            await asyncio.sleep(0.1)
                            continue
                        assert resp.status == 200, await resp.text()
                        return await resp.json()
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)  # the agent starts beside Postgres

    async def controller_metrics(self) -> dict[str, float]:
        """The controller's Prometheus samples, by ``name{labels}``."""
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{self.api_port}/metrics") as resp:
            text = await resp.text()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def dsn(self, job_id: str, user: str, password: str) -> str:
        """A URI (psql, psycopg and asyncpg all read it) through the router."""
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@127.0.0.1:{self.router_port}/job_{job_id}")

    def job_processes(self, job_id: str) -> list[int]:
        """Pids of processes whose command line names this job's directory."""
        return pids_mentioning(str(self.root / "jobs" / job_id) + "/")


def stop_pgdata(pgdata: Path) -> None:
    """Stop the PostgreSQL running on ``pgdata``, if one is (immediate: nothing to keep)."""
    if (pgdata / "postmaster.pid").exists():
        with contextlib.suppress(Exception):
            run_pg([str(bin_dir() / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "immediate",
                    "-w", "-t", "20"], check=False, timeout=30)


def pids_mentioning(text: str) -> list[int]:
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if needle in cmdline:
                found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_processes_mentioning(text: str) -> None:
    for pid in pids_mentioning(text):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def psql(dsn: str, sql: str) -> str:
    out = subprocess.run([str(bin_dir() / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                          dsn, "-c", sql], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
