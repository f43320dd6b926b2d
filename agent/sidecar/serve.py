"""``agent serve``: the sidecar beside a running job's PostgreSQL.

It ships WAL from the spool continuously, takes a recovery point (base
backup) on a schedule, and at once when the store holds none for the job
yet, and answers the controller over HTTP: health and status, ``POST
/pause`` (fast shutdown, drain the spool, pause snapshot), ``POST
/base-backup``, ``POST /dump`` and Prometheus metrics.

A pause deletes nothing locally: the spool keeps every segment the store
has not confirmed, and PGDATA stays as it is, so a failed pause can simply
be retried (a repeated pause of a stopped server takes the snapshot again,
or answers the snapshot it already took).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..basebackup import take_base_backup
from ..cli import add_store_arguments
from ..dump import dump as take_dump
from ..errors import AgentError
from ..manifest import (
    Manifest,
    ManifestError,
    dump_ids_with_manifest,
    dump_manifest_key,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from ..metrics import AgentMetrics
from ..postgres import PostgresError
from ..postmaster import pg_isready, read_postmaster, wait_for_exit, with_database
from ..snapshot import take_snapshot
from ..store import Store, StoreError, get_bytes, open_store
from ..wal import Archiver

log = logging.getLogger("jobmesh.agent.serve")

RETRY = 300.0  # a failed scheduled base backup is retried after this long (at most)


class Conflict(AgentError):
    """The request cannot run in the agent's current state (HTTP 409)."""


# --- the agent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    pgdata: Path
    job: str
    spool: Path
    base_backup_interval: float  # seconds between recovery points; 0: no scheduled backups
    dsn: str | None  # None: the local socket, as found in postmaster.pid
    stop_timeout: float = 300.0


def _summary(m: Manifest | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"id": m.id, "kind": m.kind, "created_at": m.created_at,
            "size": sum(o.size for o in m.objects), "start_lsn": m.start_lsn}


def _age(m: Manifest) -> float:
    try:
        return time.time() - datetime.fromisoformat(m.created_at).timestamp()
    except ValueError:
        return 0.0


class Agent:
    """The long-running state behind the HTTP API: archiver, schedule, last results."""

    def __init__(self, config: ServeConfig, store: Store, metrics: AgentMetrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.archiver = Archiver(store, config.job, config.spool, metrics=metrics)
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
                log.info("pausing: fast shutdown of PostgreSQL (pid %d)", pm.pid)
                os.kill(pm.pid, signal.SIGINT)
                try:
                    await wait_for_exit(pm.pid, self.config.stop_timeout)
                except TimeoutError:
                    raise AgentError(f"PostgreSQL (pid {pm.pid}) did not stop within "
                                     f"{self.config.stop_timeout:g} s") from None
            try:
                await self.archiver.drain()
            except (AgentError, StoreError, OSError) as exc:
                raise AgentError(f"cannot upload the spooled WAL: {exc}") from exc
            manifest = await take_snapshot(self.config.pgdata, self.store, self.config.job,
                                           metrics=self.metrics)
            log.info("paused: snapshot %s stored", manifest.id)
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
                                          metrics=self.metrics)
        self.last_snapshot = self.last_base_backup = manifest
        self._schedule_changed.set()
        log.info("base backup %s stored (WAL %s..%s)", manifest.id, manifest.start_wal,
                 manifest.end_wal)
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
        """Seconds until the next scheduled base backup: an interval after the latest one
        or after our own start, whichever is later. Pause snapshots do not count: restore
        replays no WAL on top of them, so only a base backup protects writes since a resume.

        A job with no recovery point at all in the store (a new one) gets its first base
        backup at once: until then a crash would lose everything it ever wrote.
        """
        interval = self.config.base_backup_interval
        if interval <= 0:
            return None
        if self._history_loaded and self.last_snapshot is None:
            return max(self._retry_at - time.time(), 0.0)
        since = time.time() - self._started
        if self.last_base_backup is not None:
            since = min(since, _age(self.last_base_backup))
        return max(interval - since, self._retry_at - time.time(), 0.0)

    async def schedule_base_backups(self) -> None:
        """Runs until cancelled (at shutdown)."""
        while (due := self.next_base_backup_in()) is not None:
            if due <= 0:
                if self.paused is None and not self.pausing and (
                        read_postmaster(self.config.pgdata) is not None):
                    try:
                        await self.base_backup()
                    except Exception as exc:
                        log.warning("scheduled base backup failed: %s", _one_line(exc))
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
        }
        if pm is not None:
            try:
                out["wal"].update(await _wal_status(self.dsn()))
            except Exception as exc:  # Postgres starting or stopping: report what we can
                out["postgres"]["error"] = _one_line(exc)
        return out


def _sizes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


async def _wal_status(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=3, server_settings={
        "application_name": "jobmesh agent status"})
    try:
        row = await conn.fetchrow(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END::text AS lsn, last_archived_wal,"
            " last_archived_time, failed_count, last_failed_wal FROM pg_stat_archiver",
            timeout=3)
    finally:
        await conn.close()
    assert row is not None
    at = row["last_archived_time"]
    return {"current_lsn": row["lsn"], "last_archived": row["last_archived_wal"],
            "last_archived_at": at.isoformat() if at else None,
            "failed_count": row["failed_count"], "last_failed": row["last_failed_wal"]}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- HTTP ---------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, indent=2) + "\n",
                        content_type="application/json")


def _manifest_response(m: Manifest) -> web.Response:
    return web.Response(body=m.to_json(), content_type="application/json")


async def _operation(what: str, op: Any) -> web.Response:
    try:
        return _manifest_response(await op())
    except Conflict as exc:
        return _json({"error": _one_line(exc)}, 409)
    except (AgentError, StoreError, PostgresError, ManifestError) as exc:
        log.error("%s failed: %s", what, _one_line(exc))
        return _json({"error": _one_line(exc)}, 500)
    except Exception as exc:
        log.exception("%s failed", what)
        return _json({"error": _one_line(exc)}, 500)


def build_app(agent: Agent) -> web.Application:
    async def healthz(_req: web.Request) -> web.Response:
        ok, body = await agent.health()
        return _json(body, 200 if ok else 503)

    async def status(_req: web.Request) -> web.Response:
        return _json(await agent.status())

    async def metrics(_req: web.Request) -> web.Response:
        agent.metrics.archive_lag.set(await asyncio.to_thread(agent.archiver.lag))
        return web.Response(body=generate_latest(agent.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def pause(_req: web.Request) -> web.Response:
        return await _operation("pause", agent.pause)

    async def base_backup(_req: web.Request) -> web.Response:
        return await _operation("base backup", agent.base_backup)

    async def dump(req: web.Request) -> web.Response:
        return await _operation("dump", lambda: agent.dump(req.query.get("database")))

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/status", status),
                    web.get("/metrics", metrics), web.post("/pause", pause),
                    web.post("/base-backup", base_backup), web.post("/dump", dump)])
    return app


# --- CLI --------------------------------------------------------------------------------


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run beside a job's PostgreSQL: WAL, backups, HTTP API",
                       description="Ship WAL continuously, take scheduled base backups and "
                                   "serve /healthz, /status, /metrics, POST /pause, "
                                   "/base-backup and /dump.")
    p.add_argument("--pgdata", required=True, type=Path, metavar="DIR")
    add_store_arguments(p)
    p.add_argument("--listen", default="127.0.0.1:8008", metavar="HOST:PORT",
                   help="HTTP address (default 127.0.0.1:8008; port 0 picks a free one)")
    p.add_argument("--spool", type=Path, metavar="DIR",
                   help="where Postgres archives WAL (default: <PGDATA>.spool)")
    p.add_argument("--base-backup-interval", type=float, default=3600, metavar="S",
                   help="seconds between base backups (default 3600; 0: none)")
    p.add_argument("--dsn", help="postgresql:// URI for base backups, dumps and status "
                                 "(default: the local socket as postgres)")
    p.add_argument("--stop-timeout", type=float, default=300, metavar="S",
                   help="how long a pause waits for PostgreSQL to stop (default 300)")
    p.set_defaults(run=run)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise AgentError(f"--listen: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    pgdata = args.pgdata.absolute()
    if not (pgdata / "PG_VERSION").is_file():
        raise AgentError(f"{pgdata} is not a PostgreSQL data directory")
    if args.base_backup_interval < 0:
        raise AgentError("--base-backup-interval must be >= 0")
    spool = (args.spool or pgdata.with_name(pgdata.name + ".spool")).absolute()
    config = ServeConfig(pgdata, args.job, spool, args.base_backup_interval, args.dsn,
                         args.stop_timeout)
    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    return asyncio.run(serve(config, store, host, port))


async def serve(config: ServeConfig, store: Store, host: str, port: int) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(config, store, AgentMetrics())
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=5)
        try:
            await site.start()
        except OSError as exc:
            raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        bound = runner.addresses[0]
        log.info("agent listening on http://%s:%d (job %s, store %s)", bound[0], bound[1],
                 config.job, store.url)
        archiving = asyncio.create_task(agent.archiver.run(stop), name="archiver")
        background = [asyncio.create_task(agent.schedule_base_backups(), name="schedule"),
                      asyncio.create_task(_quietly("reading the store", agent.load_history())),
                      asyncio.create_task(_quietly("arming archive_timeout",
                                                   arm_archive_timeout(agent, stop)))]
        await stop.wait()
        log.info("stopping: final WAL drain")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await agent.shutdown()
        await archiving
        try:
            drained = await agent.archiver.drain()
        except Exception as exc:
            log.error("final WAL drain failed, the spool keeps the files: %s", _one_line(exc))
            return 1
        log.info("stopped (%d WAL files shipped in the final drain)", drained)
        return 0
    finally:
        await runner.cleanup()
        await store.close()


async def arm_archive_timeout(agent: Agent, stop: asyncio.Event) -> None:
    """Reload Postgres's configuration once it accepts connections.

    PostgreSQL 15's checkpointer computes its first sleep while the startup
    process still runs, ignoring archive_timeout, and then sleeps a whole
    checkpoint_timeout: until a reload, archive_timeout would not bound the
    data a crash can lose.
    """
    while not stop.is_set():
        with contextlib.suppress(Conflict):
            dsn = agent.dsn()
            if await pg_isready(dsn):
                conn = await asyncpg.connect(dsn, timeout=10)
                try:
                    await conn.execute("select pg_reload_conf()")
                finally:
                    await conn.close()
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def _quietly(what: str, coro: Any) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("%s failed: %s", what, _one_line(exc))
