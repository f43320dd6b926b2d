"""The sidecar's state: the ``Agent`` behind the HTTP API.

It ships WAL from the spool continuously (an ``Archiver``), streams the
unfinished segment to the store every window (a ``WalStreamer``), takes
recovery points (base backups) as ``policy.py`` says and prunes old ones
after each (``prune.retain``), and runs the operations the controller asks
for: a pause (fast shutdown, last streamed WAL, drain the spool, pause
snapshot), a base backup, a dump. Each is single-flight where running two at
once would be wrong.

A pause deletes nothing locally: the spool keeps every segment the store
has not confirmed, and PGDATA stays as it is, so a failed pause can simply
be retried (a repeated pause of a stopped server takes the snapshot again,
or answers the snapshot it already took).

Just over ~400 lines on purpose: one class, the sidecar's state and its
operations, which share that state; the HTTP layer (``api.py``), the run loop
(``run.py``) and the schedule's rules (``policy.py``) are apart already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobmesh.defaults import KEEP_BASE_BACKUPS
from jobmesh.errors import one_line

from ..basebackup import take_base_backup
from ..dump import dump as take_dump
from ..errors import AgentError
from ..fence import FENCE_INTERVAL
from ..manifest import (
    Manifest,
    ManifestError,
    dump_ids_with_manifest,
    dump_manifest_key,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from ..metrics import AgentMetrics
from ..postmaster import pg_isready, read_postmaster, wait_for_exit, with_database
from ..prune import retain
from ..snapshot import take_snapshot
from ..store import Store, StoreError, get_bytes
from ..stream import WalStreamer
from ..wal import Archiver
from ..walnames import format_lsn
from .policy import BackupPolicy, Position, next_base_backup
from .queries import server_position, switch_wal, wal_status

log = logging.getLogger("jobmesh.agent.serve")

RETRY = 300.0  # a failed scheduled base backup is retried after this long (at most)
# s between looks at the server's timeline and WAL position when no WAL segment was archived
# meanwhile (a look is a connection: 200 jobs at 5 s were 40 connections a second); each
# archived segment makes a look due at once, since only WAL moves the position
POSITION_EVERY = 30.0


class Conflict(AgentError):
    """The request cannot run in the agent's current state (HTTP 409)."""


@dataclass(frozen=True)
class ServeConfig:
    pgdata: Path
    job: str
    spool: Path
    base_backup_interval: float  # seconds between recovery points; 0: no scheduled backups
    dsn: str | None  # None: the local socket, as found in postmaster.pid
    stop_timeout: float = 300.0
    wal_window: float = 0.0  # s between uploads of streamed WAL; 0: no streaming
    base_backup_wal_bytes: int = 0  # a base backup after this much WAL; 0: no such rule
    stream_dir: Path | None = None  # pg_receivewal's directory (default: <spool>/.stream)
    generation: int = 0  # this incarnation's (fence.py); 0: unfenced
    fence_interval: float = FENCE_INTERVAL  # s between looks for a newer claim while uploading WAL
    # base backups kept by the agent itself after each one (0: none; a controller's
    # retention decides, and only the controller deletes)
    keep_base_backups: int = KEEP_BASE_BACKUPS
    # the bearer token the API asks for (``apitoken.py``); None: an open API, for an
    # agent run by hand with --no-api-token
    api_token: str | None = field(default=None, repr=False)


def _summary(m: Manifest | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"id": m.id, "kind": m.kind, "created_at": m.created_at,
            "size": m.stored_size, "start_lsn": m.start_lsn,
            "timeline": m.timeline}


class Agent:
    """The long-running state behind the HTTP API: archiver, schedule, last results."""

    def __init__(self, config: ServeConfig, store: Store, metrics: AgentMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.archiver = Archiver(store, config.job, config.spool, metrics=metrics)
        self.streamer: WalStreamer | None = None
        if config.wal_window > 0:
            self.streamer = WalStreamer(store, config.job,
                                        config.stream_dir or config.spool / ".stream",
                                        config.pgdata, self.dsn, window=config.wal_window,
                                        metrics=metrics, generation=config.generation)
            self.archiver.on_stored.append(self.streamer.stored_whole)
        self.policy = BackupPolicy(config.base_backup_interval, config.base_backup_wal_bytes)
        self.position: Position | None = None  # the server's, as last seen
        self.retained: list[str] = []  # what the last retention run deleted
        self.last_snapshot: Manifest | None = None  # pause or base: the latest recovery point
        self.last_base_backup: Manifest | None = None
        self.last_dump: Manifest | None = None
        self._paused: Manifest | None = None  # the pause snapshot
        self.pausing = False
        self._base_backup: asyncio.Task[Manifest] | None = None
        self._pause: asyncio.Task[Manifest] | None = None
        self._dumps: set[asyncio.Task[Manifest]] = set()
        self._schedule_changed = asyncio.Event()
        self._started = time.time()
        self._retry_at = 0.0  # after a failed scheduled backup: not before this time
        self._history_loaded = False  # load_history has read the store
        self._wal_moved = asyncio.Event()  # a segment was archived since the last look
        self.archiver.on_stored.append(lambda _name: self._wal_moved.set())

    @property
    def paused(self) -> Manifest | None:
        """The pause snapshot, for as long as Postgres stays down after it."""
        if self._paused is not None and read_postmaster(self.config.pgdata) is not None:
            self._paused = None  # someone started it again: not paused any more
        return self._paused

    def dsn(self) -> str:
        if self.config.dsn:
            return self.config.dsn
        pm = read_postmaster(self.config.pgdata)
        if pm is None:
            raise Conflict(f"PostgreSQL is not running on {self.config.pgdata}")
        return pm.default_dsn()

    # -- operations -------------------------------------------------------------------

    async def pause(self) -> Manifest:
        """Single-flight: concurrent pause requests share one pause."""
        if self._pause is None or self._pause.done():
            self._pause = asyncio.create_task(self._do_pause(), name="pause")
        return await asyncio.shield(self._pause)

    async def _do_pause(self) -> Manifest:
        self.pausing = True
        laps: dict[str, float] = {}
        mark = time.monotonic()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            laps[name] = round((now - mark) * 1000, 1)
            mark = now

        try:
            pm = read_postmaster(self.config.pgdata)
            if pm is None and self.paused is not None:
                return self.paused  # a retry of a pause that succeeded: nothing changed since
            if self._base_backup is not None and not self._base_backup.done():
                self._base_backup.cancel()  # a recovery point is moot: the snapshot is one
                with contextlib.suppress(BaseException):
                    await self._base_backup
            if self._dumps:  # exports finish first; stopping would break them
                await asyncio.wait(self._dumps)
            if pm is not None:
                # The WAL written since the last finished segment goes to the store as a
                # segment of its own, so that a point-in-time restore can reach up to the
                # pause (the snapshot alone holds it otherwise, which no replay reads).
                # Zeros fill the rest of it: a few KB compressed.
                try:
                    await switch_wal(self.dsn())
                except Exception as exc:  # asyncpg's, OSError...: the pause goes on anyway
                    log.warning("pausing: cannot switch WAL first (%s)", one_line(exc))
                lap("switch")
                log.info("pausing: fast shutdown of PostgreSQL (pid %d)", pm.pid)
                os.kill(pm.pid, signal.SIGINT)
                try:
                    await wait_for_exit(pm.pid, self.config.stop_timeout)
                except TimeoutError:
                    raise AgentError(f"PostgreSQL (pid {pm.pid}) did not stop within "
                                     f"{self.config.stop_timeout:g} s") from None
                lap("stop")
            try:
                if self.streamer is not None:  # to the shutdown checkpoint, then it exits
                    await self.streamer.finish()
                lap("stream")
                await self.archiver.drain()
            except (AgentError, StoreError, OSError) as exc:
                raise AgentError(f"cannot upload the spooled WAL: {exc}") from exc
            lap("archive")
            manifest = await take_snapshot(
                self.config.pgdata, self.store, self.config.job, metrics=self.metrics,
                generation=self.config.generation,
                streamed_to=self.streamer.streamed_lsn if self.streamer is not None else 0)
            lap("snapshot")
            log.info("paused: snapshot %s stored (%s)", manifest.id,
                     ", ".join(f"{k} {v:g} ms" for k, v in laps.items()))
            if self.streamer is not None:
                try:  # the snapshot's pg_wal holds the unfinished segment now
                    await self.streamer.forget()
                except (StoreError, OSError) as exc:
                    log.warning("cannot reset the WAL stream after the pause: %s",
                                one_line(exc))
            self.last_snapshot = self._paused = manifest
            return manifest
        finally:
            self.pausing = False

    async def base_backup(self) -> Manifest:
        """Single-flight as well: a request during a running backup gets that backup."""
        if self.pausing or self.paused is not None:
            raise Conflict("the job is paused: no base backups")
        if self._base_backup is None or self._base_backup.done():
            self._base_backup = asyncio.create_task(self._do_base_backup(), name="base-backup")
        task = self._base_backup
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise Conflict("the base backup was abandoned: the job is pausing or the agent "
                               "stopping") from None
            raise

    async def _do_base_backup(self) -> Manifest:
        dsn = self.dsn()
        manifest = await take_base_backup(dsn, self.config.pgdata, self.store, self.config.job,
                                          metrics=self.metrics,
                                          generation=self.config.generation)
        self.last_snapshot = self.last_base_backup = manifest
        self._schedule_changed.set()
        log.info("base backup %s stored (WAL %s..%s)", manifest.id, manifest.start_wal,
                 manifest.end_wal)
        if not self.config.keep_base_backups:
            return manifest
        try:
            self.retained = await retain(self.store, self.config.job,
                                         self.config.keep_base_backups)
        except (AgentError, StoreError) as exc:
            log.warning("retention after base backup %s failed: %s", manifest.id,
                        one_line(exc))
        else:
            if self.retained:
                log.info("retention: %d objects deleted (older base backups and their WAL)",
                         len(self.retained))
        return manifest

    async def dump(self, database: str | None = None) -> Manifest:
        """Dump one database (default: the job's own, ``job_<id>``)."""
        if self.pausing or self.paused is not None:
            raise Conflict("the job is paused: PostgreSQL is not running")
        dsn = with_database(self.dsn(), database or f"job_{self.config.job}")
        task = asyncio.create_task(take_dump(dsn, self.store, self.config.job), name="dump")
        self._dumps.add(task)
        task.add_done_callback(self._dumps.discard)
        manifest = await asyncio.shield(task)
        self.last_dump = manifest
        return manifest

    # -- background work ------------------------------------------------------------------

    async def load_history(self) -> None:
        """Learn the latest snapshot, base backup and dump from the store (at startup)."""
        job = self.config.job
        keys = [o.key for o in await self.store.list(f"{job}/snapshots/")]
        for sid in reversed(snapshot_ids_with_manifest(keys, job)):
            try:
                m = Manifest.from_json(await get_bytes(self.store,
                                                       snapshot_manifest_key(job, sid)))
            except (ManifestError, StoreError):
                continue
            if self.last_snapshot is None:
                self.last_snapshot = m
            if m.kind == "base":
                self.last_base_backup = self.last_base_backup or m
                break
        dumps = dump_ids_with_manifest([o.key for o in await self.store.list(f"{job}/dumps/")],
                                       job)
        if dumps and self.last_dump is None:
            with contextlib.suppress(ManifestError, StoreError):
                self.last_dump = Manifest.from_json(
                    await get_bytes(self.store, dump_manifest_key(job, dumps[-1])))
        self._history_loaded = True
        self._schedule_changed.set()

    def next_base_backup_in(self) -> float | None:
        """Seconds until the next scheduled base backup (see ``policy.py``)."""
        due = next_base_backup(self.policy, now=time.time(), started=self._started,
                               history_loaded=self._history_loaded,
                               last_snapshot=self.last_snapshot,
                               last_base=self.last_base_backup, position=self.position,
                               retry_at=self._retry_at)
        return None if due is None else due.seconds

    async def watch_position(self) -> None:
        """Look at the server's timeline and WAL position after each archived file and
        every ``POSITION_EVERY`` s (every 2 s until a first look succeeds): a promotion and
        the WAL-volume rule make a base backup due. Runs until cancelled."""
        while True:
            pm = read_postmaster(self.config.pgdata)
            if pm is not None and pm.status == "ready" and not self.pausing:
                try:
                    position = await server_position(self.dsn())
                except Exception as exc:  # starting, stopping, in recovery
                    log.debug("cannot read the WAL position: %s", one_line(exc))
                else:
                    if position != self.position:
                        self.position = position
                        self._schedule_changed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wal_moved.wait(),
                                       POSITION_EVERY if self.position is not None else 2.0)
            self._wal_moved.clear()

    async def schedule_base_backups(self) -> None:
        """Runs until cancelled (at shutdown)."""
        while (due := self.next_base_backup_in()) is not None:
            if due <= 0:
                if self.paused is None and not self.pausing and (
                        read_postmaster(self.config.pgdata) is not None):
                    why = next_base_backup(
                        self.policy, now=time.time(), started=self._started,
                        history_loaded=self._history_loaded, last_snapshot=self.last_snapshot,
                        last_base=self.last_base_backup, position=self.position)
                    log.info("base backup due: %s", why.why if why else "asked")
                    try:
                        await self.base_backup()
                    except Exception as exc:
                        log.warning("scheduled base backup failed: %s", one_line(exc))
                        self._retry_at = time.time() + min(self.config.base_backup_interval,
                                                           RETRY)
                    continue
                due = 5.0  # Postgres is down or the job paused: look again shortly
            self._schedule_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._schedule_changed.wait(), due)

    async def shutdown(self) -> None:
        """Finish a pause in progress; abandon a base backup (it was never stored)."""
        if self._pause is not None and not self._pause.done():
            with contextlib.suppress(Exception):
                await self._pause
        for task in [self._base_backup, *self._dumps]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    # -- observations -------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        pm = read_postmaster(self.config.pgdata)
        if pm is None:
            return False, {"status": "unavailable", "postgres": "not running",
                           "paused": self.paused is not None}
        accepting = await pg_isready(self.dsn())
        return accepting, {"status": "ok" if accepting else "unavailable",
                           "postgres": "accepting connections" if accepting else
                           f"not accepting connections ({pm.status or 'unknown'})",
                           "paused": False}

    async def status(self) -> dict[str, Any]:
        pm = read_postmaster(self.config.pgdata)
        pending = await asyncio.to_thread(self.archiver.pending)
        sizes = await asyncio.to_thread(_sizes, pending)
        out: dict[str, Any] = {
            "job": self.config.job, "store": self.store.url,
            "postgres": {"running": pm is not None, "pid": pm.pid if pm else None},
            "paused": self.paused is not None, "pausing": self.pausing,
            "wal": {"current_lsn": None, "last_archived": None, "last_archived_at": None,
                    "failed_count": None, "last_failed": None,
                    "archive_lag_seconds": round(await asyncio.to_thread(self.archiver.lag), 3),
                    "spool_backlog": len(pending), "spool_bytes": sizes,
                    "uploaded": self.archiver.uploaded},
            "last_snapshot": _summary(self.last_snapshot),
            "last_base_backup": _summary(self.last_base_backup),
            "last_dump": _summary(self.last_dump),
            "base_backup_running": self._base_backup is not None and not self._base_backup.done(),
            "next_base_backup_in": self.next_base_backup_in(),
            "stream": None if self.streamer is None else {
                "window": self.config.wal_window, "deltas_uploaded": self.streamer.uploaded,
                "rounds": self.streamer.rounds,
                "streamed_lsn": format_lsn(self.streamer.streamed_lsn),
                "receiver_pid": (self.streamer.proc.pid if self.streamer.proc is not None
                                 and self.streamer.proc.returncode is None else None)},
        }
        if pm is not None:
            try:
                out["wal"].update(await wal_status(self.dsn()))
            except Exception as exc:  # Postgres starting or stopping: report what we can
                out["postgres"]["error"] = one_line(exc)
        return out


def _sizes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total
