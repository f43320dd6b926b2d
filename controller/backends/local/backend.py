"""The local backend: each job's PostgreSQL and its agent as processes on this machine.

A new job's PGDATA is a copy of the template snapshot (``template.py``), so a
create is a rename, a start and three statements. A resume restores the
job's latest snapshot from the store (replaying archived WAL after it when
there is any) and starts it. A pause asks the agent to stop Postgres and
snapshot it, and only once the agent answered with the stored manifest
moves the local copy into the warm cache (``warm_cache.py``), or deletes
it; a resume starts a cached copy that still equals the store's newest
state instead of restoring. A recovery after a crash ships what WAL the
A recovery after a crash starts the job again on its own PGDATA when that is
whole (``in_place.py``): PostgreSQL's crash recovery replays its local WAL
and no acknowledged commit is lost. Only when the local data is gone, not
known to be whole, or does not start (then it is kept aside) does a
recovery ship what WAL the spool still holds, discard the local remains and
restore from the store, never from the cache.

Every method is idempotent and holds a per-job lock (``job_lock.py``), so a
reconciler that retries, or runs two steps for one job at once, never
interleaves them. An instance counts as set up once its ``ready`` file
exists; one that is running without it was interrupted mid-setup and is set
up again from scratch (``instance.py`` starts, adopts and discards them).

Just over ~400 lines on purpose: the Backend protocol's methods for this
backend, one each; instances, the agent host, cgroups, the template and the
warm cache have modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import asyncpg

from jobmesh.agent.errors import AgentError
from jobmesh.agent.fence import Fenced
from jobmesh.agent.manifest import ManifestError
from jobmesh.agent.postgres import PostgresError, os_user, run_pg
from jobmesh.agent.restore import restore
from jobmesh.agent.store import StoreError, open_store
from jobmesh.defaults import ARCHIVE_TIMEOUT, BASE_BACKUP_INTERVAL, JOB_CPU, JOB_MEMORY, WAL_WINDOW
from jobmesh.errors import one_line

from ...catalog.models import JOB_ID, Job
from ...core.backend import BackendError, PermanentError, Progress, Started, Stopped
from ...mesh import AGENT_KEY_FILE, ensure_secret
from ...storage.access import StoreAccess
from ..job_lock import JobLocks
from ..job_store import (
    Rewind,
    confirm_pause,
    delete_job_objects,
    latest_snapshot,
    pending_rewind,
    rewind_done,
    snapshot_to_restore,
    stale_generation,
    stored_pause,
)
from ..step_report import Laps, Relay, mb
from .cgroups import Cgroups
from .in_place import FAILED_COPIES_BYTES, CrashLoop, FailedCopies, whole
from .instance import HOST, Instances
from .process import JobDir, empty_trash, is_ready, postmaster, prepare, remove, stop_postgres
from .sidecar import AgentHost, ship_last_wal
from .sources import delta_base, dump_source, fork, fork_source
from .template import Template
from .warm_cache import WarmCache

log = logging.getLogger("jobmesh.controller.local")

SHIP_WAIT = 30.0  # how long a recovery waits for the spool to reach the store

# What a step may fail with that is not a bug: "cannot <step>: <why>" (see job_lock).
EXPECTED_ERRORS = (AgentError, StoreError, PostgresError, ManifestError, OSError, TimeoutError,
                   aiohttp.ClientError, subprocess.SubprocessError)


class LocalBackend:
    name = "local"

    @property
    def enforced_limits(self) -> frozenset[str]:
        """The spec fields it enforces: cpu and memory where it can make cgroups."""
        if self.cgroups is None or self.cgroups.mode is None:
            return frozenset()
        return frozenset({"cpu", "memory"})

    def __init__(self, root: Path, store_url: str, *, s3_endpoint: str | None = None,
                 archive_timeout: int = ARCHIVE_TIMEOUT, wal_window: float = WAL_WINDOW,
                 base_backup_interval: float = BASE_BACKUP_INTERVAL,
                 python: str = sys.executable, spares: int = 2, start_timeout: float = 600,
                 pause_timeout: float = 3600, warm_cache_bytes: int = 10 * 2**30,
                 failed_copies_bytes: int = FAILED_COPIES_BYTES,
                 job_cpu: str | None = JOB_CPU, job_memory: str | None = JOB_MEMORY,
                 cgroups: bool = True, agent_key: bytes | None = None,
                 store_access: StoreAccess | None = None) -> None:
        """``agent_key``: what the jobs' agent tokens derive from (default: the root's
        ``agent-key``, made once). ``store_access``: the agent host gets store credentials
        of its own, which cannot delete (``controller/storage/access.py``)."""
        self.root = Path(root).absolute()
        self.store_url = store_url
        self.s3_endpoint = s3_endpoint
        try:
            self.store = open_store(store_url, s3_endpoint=s3_endpoint)
        except StoreError as exc:
            raise BackendError(str(exc)) from exc
        self.template = Template(self.root / "template", self.store, spares=spares)
        if warm_cache_bytes < 0:
            raise BackendError(f"the warm cache's size must be >= 0 bytes, not {warm_cache_bytes}")
        self.warm_cache = WarmCache(self.root / "cache", warm_cache_bytes)  # 0: none
        key = agent_key or ensure_secret(self.root / AGENT_KEY_FILE).encode()
        self.agents = AgentHost(self.root, python, store_url, s3_endpoint, key, store_access)
        self.cgroups = Cgroups(self.root) if cgroups else None
        self.instances = Instances(
            self.template, self.agents, self.cgroups, archive_timeout=archive_timeout,
            wal_window=wal_window, base_backup_interval=base_backup_interval,
            start_timeout=start_timeout, pause_timeout=pause_timeout, job_cpu=job_cpu,
            job_memory=job_memory)
        self.locks = JobLocks(EXPECTED_ERRORS, log)
        self.crash_loop = CrashLoop()
        self.failed_copies = FailedCopies(self.root / "failed", failed_copies_bytes)
        self._closed = False

    # --- Backend ------------------------------------------------------------------------

    async def start(self, on_change: Callable[[str], None] | None = None) -> None:
        """``on_change`` is not used: the reconciler's health check finds dead processes."""
        async with self.locks.errors("start the local backend"):
            await asyncio.to_thread(self._prepare_root)
            await self.warm_cache.start()
            await self.agents.ensure()
            await self.template.ensure()

    async def close(self) -> None:
        """Stop our own background work; the jobs' processes (and their agent host, while it
        serves any) keep running."""
        if self._closed:
            return
        self._closed = True
        await self.template.close()
        await self.agents.settle()
        with contextlib.suppress(*EXPECTED_ERRORS, BackendError):
            if await self.agents.jobs() == frozenset():
                await self.agents.stop()  # idle: the next start makes a new one
        self.agents.reap()
        await self.store.close()

    async def create(self, job: Job, progress: Progress) -> Started:
        async with self._job("create", job.id) as jd:
            if (adopted := await self.instances.adopt(job, jd)) is not None:
                return adopted
            dump, forked = dump_source(job), fork_source(job)
            laps = Laps()
            # Nothing of an interrupted earlier attempt is worth keeping: no client has
            # seen this job yet. Its WAL in the store would clash with ours.
            await self.instances.discard(jd)
            await self.warm_cache.drop(job.id)
            await delete_job_objects(self.store, job.id)
            if forked is not None:
                return await fork(job, jd, progress, laps, *forked, store=self.store,
                                  s3_endpoint=self.s3_endpoint, template=self.template,
                                  instances=self.instances)
            if self.template.manifest is None:
                await progress("preparing the template")
            await asyncio.to_thread(prepare, jd)
            how = await self.template.take(jd.pgdata)
            laps("template")
            try:
                port, info = await self.instances.start(job, jd, progress, "create",
                                                        dump=dump, laps=laps)
            except PermanentError:
                # It will not be retried (a dump that does not load): free its PostgreSQL
                # now rather than hold it until the user retries or deletes the job.
                await self.instances.discard(jd)
                raise
            log.info("created job %s in %.0f ms (%s)", job.id, laps.total(), laps)
            return Started(HOST, port, info.url,
                           detail={"template": how, "timings_ms": laps.laps})

    async def resume(self, job: Job, progress: Progress) -> Started:
        async with self._job("resume", job.id) as jd:
            if (adopted := await self.instances.adopt(job, jd)) is not None:
                return adopted
            await self.instances.discard(jd)
            if (rewind := await pending_rewind(self.store, job)) is not None:
                await self.warm_cache.drop(job.id)  # the state the rewind replaces
                return await self._restore(job, jd, progress, "rewind", rewind=rewind)
            if (cached := await self._from_cache(job, jd, progress)) is not None:
                return cached
            return await self._restore(job, jd, progress, "resume")

    async def recover(self, job: Job, progress: Progress) -> Started:
        async with self._job("recover", job.id) as jd:
            if (adopted := await self.instances.adopt(job, jd)) is not None:
                return adopted
            await self.warm_cache.drop(job.id)  # never used here; stale once the job runs
            if await asyncio.to_thread(whole, jd):
                if self.crash_loop.allow(job.id):
                    if (started := await self._in_place(job, jd, progress)) is not None:
                        return started
                else:
                    log.warning("job %s crashed %d times within %g s on its own data: "
                                "restoring it from the store", job.id, self.crash_loop.limit,
                                self.crash_loop.window)
            await ship_last_wal(jd, self.agents, self.store, progress, timeout=SHIP_WAIT)
            if await latest_snapshot(self.store, job.id) is None and await asyncio.to_thread(
                    (jd.pgdata / "PG_VERSION").exists):
                # Its first base backup never finished: the local data is the only copy.
                log.warning("job %s has no recovery point in the store: restarting it from its "
                            "local data", job.id)
                await asyncio.to_thread(prepare, jd)
                port, info = await self.instances.start(job, jd, progress, "recover in place")
                return Started(HOST, port, info.url, detail={"in_place": True})
            await self.instances.discard(jd)
            return await self._restore(job, jd, progress, "recover")

    async def _in_place(self, job: Job, jd: JobDir, progress: Progress) -> Started | None:
        """Start the crashed job again on its own PGDATA; None when that fails (the copy is
        then kept aside, and the caller restores from the store)."""
        laps = Laps()
        await progress("restarting PostgreSQL on its own data (crash recovery)")
        try:
            await asyncio.to_thread(prepare, jd)
            port, info = await self.instances.restart(job, jd, laps=laps)
        except (*EXPECTED_ERRORS, BackendError, asyncpg.PostgresError) as exc:
            await stop_postgres(jd, "immediate")
            kept = await asyncio.to_thread(self.failed_copies.keep, jd)
            log.warning("job %s does not start on its own data (%s): restoring it from the "
                        "store%s", job.id, one_line(exc),
                        f"; the copy that failed is kept in {kept}" if kept else "")
            return None
        log.info("recovery of job %s in place: crash recovery on its own data in %.0f ms "
                 "(%s)", job.id, laps.total(), laps)
        return Started(HOST, port, info.url, bytes_moved=0,
                       detail={"source": "local", "in_place": True, "timings_ms": laps.laps})

    async def pause(self, job: Job) -> Stopped:
        async with self._job("pause", job.id) as jd:
            if not await asyncio.to_thread(jd.path.exists):
                # Retried after the local copy was deleted: the snapshot is the pause.
                if (done := await stored_pause(self.store, job.id)) is not None:
                    return done
                raise BackendError(f"job {job.id} has no instance here and its latest "
                                   "snapshot is not a pause snapshot")
            laps = Laps()
            try:
                manifest = await self.instances.pause(job, jd)
            except BackendError:
                if postmaster(jd) is not None or await self.instances.stopped_cleanly(jd):
                    raise
                # Postgres crashed before the agent could stop it: once more, from the
                # start (which lets Postgres recover from its own WAL first).
                manifest = await self.instances.pause(job, jd)
            laps("agent pause")
            stopped = await confirm_pause(self.store, job.id, manifest)
            laps("confirm")
            # The pause drained the spool and Postgres is down: the agent has nothing left
            # to ship, so it gets little time to exit (one that cancelled a base backup
            # hangs at exit: see agent.tarstream's aclose).
            await self.agents.remove(job.id, timeout=5)
            await stop_postgres(jd, "immediate")  # the agent stopped it; nothing is left
            laps("agent exit")
            await self.warm_cache.put(jd, manifest)  # PGDATA as the snapshot's copy, if kept
            await asyncio.to_thread(remove, jd)  # the rest (or all, if not kept)
            self.instances.forget(job.id)
            laps("cache")
            log.info("pause of job %s: snapshot %s in %.0f ms (%s)", job.id, manifest.id,
                     laps.total(), laps)
            return stopped

    async def alive(self, job: Job) -> bool | None:
        jd = self._dir(job.id)
        try:
            pm = postmaster(jd)
        except OSError:
            return None
        if pm is None:
            return False
        lock = self.locks.lock(job.id)
        if not lock.locked() and is_ready(jd) and not await self._has_agent(job.id):
            async with lock:
                if postmaster(jd) is not None and not await self._has_agent(job.id):
                    log.warning("job %s: its agent is not running; restarting it", job.id)
                    try:
                        await self.instances.spawn_agent(job, jd)
                    except (*EXPECTED_ERRORS, BackendError) as exc:
                        log.error("job %s: cannot restart its agent: %s", job.id,
                                  one_line(exc))
        return True

    async def _has_agent(self, job_id: str) -> bool:
        if self.agents.starting(job_id):
            return True
        try:
            return await self.agents.agent(job_id) is not None
        except (*EXPECTED_ERRORS, BackendError) as exc:
            log.warning("cannot ask the agent host about job %s: %s", job_id, one_line(exc))
            return True  # (not known to be missing: asked again at the next health check)

    async def delete(self, job: Job) -> None:
        async with self._job("delete", job.id) as jd:
            await self.instances.discard(jd)
            await self.warm_cache.drop(job.id)
            await delete_job_objects(self.store, job.id)

    async def orphans(self, known: set[str]) -> list[str]:
        """Job directories here whose job the catalog does not know (stopped ones too:
        their data is kept until an operator removes it)."""
        def ids() -> list[str]:
            try:
                return [e.name for e in (self.root / "jobs").iterdir()
                        if e.is_dir() and JOB_ID.fullmatch(e.name)]
            except FileNotFoundError:
                return []
        return sorted(set(await asyncio.to_thread(ids)) - known)

    async def stop_orphan(self, job_id: str) -> None:
        async with self._job("stop orphan", job_id) as jd:
            await stop_postgres(jd, "fast", timeout=self.instances.start_timeout)
            await self.agents.remove(job_id, timeout=60)  # its final drain ships the WAL

    # --- where a resume's PGDATA comes from ---------------------------------------------

    async def _from_cache(self, job: Job, jd: JobDir, progress: Progress) -> Started | None:
        """Start the job's PGDATA from the warm cache, if it holds the store's newest state
        (None: restore from the store, as without a cache)."""
        laps = Laps()
        await asyncio.to_thread(prepare, jd)
        entry = await self.warm_cache.take(job.id, jd.pgdata, self.store, stale_to=jd.pgdata)
        if entry is None:
            return None
        laps("cache")
        try:
            port, info = await self.instances.start(job, jd, progress, "resume", laps=laps)
        except Exception as exc:
            log.warning("job %s: cannot start its PGDATA from the warm cache (%s); restoring "
                        "from the store", job.id, one_line(exc))
            await self.instances.discard(jd)
            return None
        log.info("resume of job %s: pause snapshot %s from the warm cache in %.0f ms (%s)",
                 job.id, entry.snapshot, laps.total(), laps)
        return Started(HOST, port, info.url, bytes_moved=0,
                       detail={"source": "cache", "snapshot": entry.snapshot, "kind": "pause",
                               "wal_replayed": False, "timings_ms": laps.laps})

    async def _restore(self, job: Job, jd: JobDir, progress: Progress, how: str, *,
                       rewind: Rewind | None = None) -> Started:
        laps = Laps()
        manifest = await snapshot_to_restore(self.store, job.id)  # none: PermanentError
        size = manifest.uncompressed_size if manifest.chunked else manifest.stored_size
        await progress(f"restoring {mb(size)}")
        await asyncio.to_thread(prepare, jd)
        base = await delta_base(self.template, jd, manifest)
        laps("base")
        relay = Relay(progress, "restoring", size)
        try:
            result = await restore(jd.pgdata, self.store, job.id, s3_endpoint=self.s3_endpoint,
                                   progress=relay, generation=job.generation, delta=True,
                                   target_time=rewind.at if rewind else None)
        except Fenced as exc:
            raise stale_generation(exc) from None
        except AgentError as exc:
            if rewind is None:
                raise
            raise PermanentError(f"cannot rewind job {job.id} to {rewind.at}: "
                                 f"{one_line(exc)}") from exc
        await relay.flush()
        laps("restore")
        port, info = await self.instances.start(job, jd, progress, how,
                                                recovery=result.recovery_configured, laps=laps)
        if rewind is not None:  # before any client can reach it: see job_store.pending_rewind
            await rewind_done(self.store, job, rewind)
        log.info("%s of job %s: %s snapshot %s, %s restored in %.0f ms (%s)", how, job.id,
                 result.manifest.kind, result.manifest.id, mb(result.bytes_restored),
                 laps.total(), laps)
        return Started(HOST, port, info.url, bytes_moved=result.bytes_restored,
                       detail={"source": "store", "base": base, "snapshot": result.manifest.id,
                               "kind": result.manifest.kind,
                               "wal_replayed": result.recovery_configured,
                               "skipped": [sid for sid, _ in result.skipped],
                               "timings_ms": laps.laps})

    # --- plumbing -----------------------------------------------------------------------

    def _prepare_root(self) -> None:
        for d in (self.root, self.root / "jobs"):
            if not d.exists():
                d.mkdir(mode=0o755, parents=True)
                d.chmod(0o755)
        empty_trash(self.root)
        if os_user() is None:
            return
        # Postgres (as that user) works under root, and reads WAL from a file:// store
        # during recovery, where a path it cannot enter would end recovery early.
        places = [self.root / "jobs"]
        if self.store_url.startswith("file://") and Path(self.store_url[7:]).is_dir():
            places.append(Path(self.store_url[7:]))
        for place in places:
            if run_pg(["test", "-x", str(place)], check=False).returncode != 0:
                raise BackendError(f"the {os_user()} OS user cannot enter {place}: use a "
                                   "directory it can reach (not under /root)")

    def _dir(self, job_id: str) -> JobDir:
        return JobDir(self.root, job_id)

    @contextlib.asynccontextmanager
    async def _job(self, what: str, job_id: str) -> AsyncIterator[JobDir]:
        """A step on the job (under its lock, failing as one line) and its directory."""
        async with self.locks.step(what, job_id):
            yield self._dir(job_id)
