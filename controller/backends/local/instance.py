"""A local job's instance: a PGDATA here brought up as the job's, adopted, paused, discarded.

The backend (``backend.py``) decides which PGDATA a step starts: the
template's copy, the warm cache's, a restore's, the local remains. This
module starts it in place: PostgreSQL on a free port, the job's database
name and passwords (``job_database.py``), the ``ready`` marker, then the
agent. It also finds and adopts an instance a former controller started,
asks an instance's agent for the pause snapshot, and takes an instance away.
The jobs' agents all run in one agent host process (``sidecar.py``).
"""

from __future__ import annotations

import asyncio
import logging
import pwd
from pathlib import Path

import asyncpg

from jobmesh.agent.manifest import Manifest
from jobmesh.agent.postgres import free_port, os_user
from jobmesh.agent.postmaster import Postmaster

from ...catalog.models import Job
from ...core.backend import BackendError, Progress, Started
from ..job_database import (
    connect,
    import_dump,
    personalise,
    upgrade_reader,
    wait_until_writable,
)
from ..job_spec import archive_timeout, wal_window
from ..pg_tuning import TRIMS, memory_settings
from ..step_report import Laps
from .cgroups import Cgroups, limits_of
from .process import (
    JobDir,
    PortTaken,
    cleanly_stopped,
    is_ready,
    mark_ready,
    postgres_settings,
    postmaster,
    prepare,
    remove,
    start_postgres,
    stop_postgres,
)
from .sidecar import AgentHost, AgentInfo, agent_settings, request_pause
from .template import Template

log = logging.getLogger("jobmesh.controller.local")

HOST = "127.0.0.1"


class Instances:
    """How the local backend starts, adopts, pauses and discards a job's instance."""

    def __init__(self, template: Template, agents: AgentHost, cgroups: Cgroups | None, *,
                 archive_timeout: int, wal_window: float, base_backup_interval: float,
                 start_timeout: float, pause_timeout: float, job_cpu: str | None = None,
                 job_memory: str | None = None) -> None:
        self.template = template
        self.agents = agents
        self.cgroups = cgroups
        self.job_cpu = job_cpu  # a job's limits when its spec sets none (None: unlimited)
        self.job_memory = job_memory
        self.archive_timeout = archive_timeout
        self.wal_window = wal_window
        self.base_backup_interval = base_backup_interval
        self.start_timeout = start_timeout  # until Postgres accepts writes (WAL replay included)
        self.pause_timeout = pause_timeout  # for the agent's stop, drain and snapshot upload

    async def adopt(self, job: Job, jd: JobDir) -> Started | None:
        """The running, fully set up instance of ``job``, if there is one (its agent
        restarted if need be)."""
        pm = postmaster(jd)
        if pm is None or not await asyncio.to_thread(is_ready, jd):
            return None
        try:
            conn = await connect(jd.run, pm.port)
        except (OSError, asyncpg.PostgresError):
            if postmaster(jd) is None:
                return None  # it was dying as we looked
            raise
        info = await self._serve_again(job, jd, pm.port, conn, Laps())
        return Started(HOST, pm.port, info.url, detail={"adopted": True})

    async def start(self, job: Job, jd: JobDir, progress: Progress, how: str, *,
                    recovery: bool = False, dump: Path | None = None,
                    laps: Laps | None = None,
                    database: str | None = None) -> tuple[int, AgentInfo]:
        """Start the PGDATA in place, make it the job's, mark it ready, start its agent.

        ``database``: the name the job's database has in this PGDATA, if it is neither the
        job's nor the template's (a fork's: its source's)."""
        laps = laps or Laps()
        if how != "create":
            await progress("starting PostgreSQL")
        port = (await self.start_postgres(job, jd)).port
        laps("start")
        conn = await connect(jd.run, port)
        try:
            if recovery:
                await progress("replaying archived WAL")
                await wait_until_writable(conn, self.start_timeout)
                laps("replay")
            outdated = await personalise(conn, job.id, database or self.template.database,
                                         job.backend_password)
        finally:
            await conn.close()
        if outdated:
            await upgrade_reader(jd.run, port, job.id)
        laps("personalise")
        if dump is not None:
            await import_dump(jd.run, port, job.id, dump, progress)
            laps("import")
        await asyncio.to_thread(mark_ready, jd, how)
        info = await self.spawn_agent(job, jd, wait=False)
        laps("agent")
        return port, info

    async def pause(self, job: Job, jd: JobDir) -> Manifest:
        """The agent's pause snapshot (Postgres stopped by the agent); a crashed Postgres
        is started first to recover from its own WAL, and a dead agent restarted."""
        pm = postmaster(jd)
        if pm is None and not await self.stopped_cleanly(jd):
            # A snapshot needs a clean shutdown: let Postgres replay its WAL first.
            log.warning("job %s crashed: starting it to recover before the pause", job.id)
            await asyncio.to_thread(prepare, jd)
            pm = await self.start_postgres(job, jd)
        info = await self.agents.agent(job.id) or await self.spawn_agent(job, jd)
        return await request_pause(info, self.pause_timeout)

    async def restart(self, job: Job, jd: JobDir, *, laps: Laps) -> tuple[int, AgentInfo]:
        """Start a crashed instance again on its own data: PostgreSQL replays its local WAL
        (on the port it had, when that is free, so routes need not change). Its agent is
        kept if it still runs (it finds the new server through postmaster.pid)."""
        pm = await self.start_postgres(job, jd, prefer=job.port)
        laps("start")
        conn = await connect(jd.run, pm.port)
        return pm.port, await self._serve_again(job, jd, pm.port, conn, laps)

    async def _serve_again(self, job: Job, jd: JobDir, port: int, conn: asyncpg.Connection,
                           laps: Laps) -> AgentInfo:
        """A set-up instance running again (adopted or restarted): writable (its WAL
        replayed), the job's passwords and privileges current, its agent running."""
        try:
            await wait_until_writable(conn, self.start_timeout)
            laps("crash recovery")
            outdated = await personalise(conn, job.id, self.template.database,
                                         job.backend_password)
        finally:
            await conn.close()
        if outdated:
            await upgrade_reader(jd.run, port, job.id)
        info = await self.agents.agent(job.id)
        if info is None:
            info = await self.spawn_agent(job, jd)
            laps("agent")
        return info

    async def start_postgres(self, job: Job, jd: JobDir, *,
                             prefer: int | None = None) -> Postmaster:
        """Start the job's Postgres on a free port (``prefer`` first, if given), on another
        one when a server that started meanwhile took it first."""
        limits = limits_of(job.spec, self.job_cpu, self.job_memory)
        join = []
        if self.cgroups is not None and self.cgroups.mode is not None:
            user = os_user()
            join = await asyncio.to_thread(self.cgroups.prepare, job.id, limits,
                                           pwd.getpwnam(user).pw_uid if user else None)
        for attempt in range(3):
            port = prefer if attempt == 0 and prefer else free_port()
            try:
                return await start_postgres(
                    jd, {**self.settings(job, jd, port), **memory_settings(limits.memory)},
                    timeout=self.start_timeout, join=join)
            except PortTaken:
                if attempt == 2:
                    raise
                log.warning("job %s: its port was taken before PostgreSQL bound it; "
                            "starting on another", job.id)
        raise AssertionError("unreachable")

    async def stopped_cleanly(self, jd: JobDir) -> bool:
        return await asyncio.to_thread(cleanly_stopped, jd.pgdata)

    def settings(self, job: Job, jd: JobDir, port: int) -> dict[str, str]:
        try:
            timeout = archive_timeout(job.spec, self.archive_timeout)
        except ValueError as exc:
            raise BackendError(f"job {job.id}: {exc}") from exc
        return {**postgres_settings(jd, port, timeout), **TRIMS}

    async def spawn_agent(self, job: Job, jd: JobDir, *, wait: bool = True) -> AgentInfo:
        """Start the job's agent (in the agent host); ``wait=False`` returns before the
        host has answered (a start serves clients before its agent runs)."""
        try:
            window = wal_window(job.spec, self.wal_window)
        except ValueError as exc:
            raise BackendError(f"job {job.id}: {exc}") from exc
        settings = agent_settings(jd, base_backup_interval=self.base_backup_interval,
                                  wal_window=window, generation=job.generation)
        if not wait:
            return await self.agents.put_soon(job.id, settings)
        return await self.agents.put(job.id, settings)

    async def discard(self, jd: JobDir) -> None:
        """Stop whatever runs of the job here and delete its local files."""
        if not await asyncio.to_thread(jd.path.exists):
            return
        await self.agents.remove(jd.job_id, timeout=10)
        await stop_postgres(jd, "immediate")
        await asyncio.to_thread(remove, jd)
        self.forget(jd.job_id)

    def forget(self, job_id: str) -> None:
        """Remove the job's cgroups (once its processes are gone)."""
        if self.cgroups is not None:
            self.cgroups.remove(job_id)
