"""The local agent host: one process that is the agent of every job on this machine.

A per-job agent process costs a Python interpreter with aiohttp, asyncpg and
prometheus_client loaded (about 50 MB RSS and half a second of CPU to start)
beside a PostgreSQL of about 15 MB; a wake storm spawned one per wake. The
local backend instead runs one host (``jobmesh agent host``) and tells it
which jobs run here: ``PUT /jobs/{job}`` with the job's agent settings starts
its ``SidecarRun``, ``DELETE /jobs/{job}`` stops it (the final WAL drain, as
a SIGTERM to ``agent serve``) and answers the exit status ``agent serve``
would have had. Each job's API is ``agent serve``'s under ``/jobs/{job}``,
so a job's agent URL is ``http://127.0.0.1:<port>/jobs/<job>``. All jobs
share one store client. A job fenced off (``run.py``) leaves the host on its
own; ``GET /jobs`` lists those that run. The Kubernetes sidecar stays one
``agent serve`` per pod.

The host keeps no state of its own: when it dies the controller starts a new
one and puts its running jobs back (a job's archiver picks the spool up where
the last one left it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import signal
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from aiohttp import web

from jobmesh.errors import one_line

from ..errors import AgentError
from ..store import Store
from .api import allowed, refused, routes
from .daemon import Agent, ServeConfig
from .run import SidecarRun

log = logging.getLogger("jobmesh.agent.host")

# The job whose work a log line is about: set for each run's tasks and each request on a job.
JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("agent_host_job", default=None)

_PATHS = {"pgdata", "spool", "stream_dir"}
_NUMBERS = {"base_backup_interval", "stop_timeout", "wal_window", "fence_interval"}
_COUNTS = {"base_backup_wal_bytes", "generation", "keep_base_backups"}


def config_from_json(job: str, body: Any) -> ServeConfig:
    """A job's agent settings as ``PUT /jobs/{job}`` sends them (``ServeConfig``'s
    fields by name; paths as strings); ``AgentError`` names what is wrong."""
    if not isinstance(body, dict):
        raise AgentError("expected a JSON object of agent settings")
    known = {f.name for f in fields(ServeConfig)}
    if unknown := sorted(set(body) - known):
        raise AgentError(f"unknown agent settings: {', '.join(unknown)}")
    values: dict[str, Any] = {"job": job, "dsn": body.get("dsn")}
    for name, value in body.items():
        if name in _PATHS and value is not None:
            if not isinstance(value, str) or not value.startswith("/"):
                raise AgentError(f"{name}: expected an absolute path, got {value!r}")
            values[name] = Path(value)
        elif name in _NUMBERS or name in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise AgentError(f"{name}: expected a number >= 0, got {value!r}")
            values[name] = int(value) if name in _COUNTS else float(value)
        elif name == "job" and value != job:
            raise AgentError(f"job: the settings are for {value!r}, not {job!r}")
        elif name == "api_token":
            if not isinstance(value, str) or len(value) < 16:
                raise AgentError("api_token: expected the job's agent token")
            values[name] = value
    for required in ("pgdata", "spool", "base_backup_interval"):
        if required not in values:
            raise AgentError(f"{required}: missing")
    if not (values["pgdata"] / "PG_VERSION").is_file():
        raise AgentError(f"{values['pgdata']} is not a PostgreSQL data directory")
    return ServeConfig(**values)


def config_to_json(config: ServeConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


class AgentHost:
    """The jobs' runs, each started and stopped under its job's lock."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.runs: dict[str, SidecarRun] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def agent(self, job: str) -> Agent:
        """The job's agent, for a request on it (whose log lines then name the job)."""
        JOB.set(job)
        run = self.runs.get(job)
        if run is None:
            raise web.HTTPNotFound(text=json.dumps({"error": f"job {job} has no agent in "
                                                    "this host"}) + "\n",
                                   content_type="application/json")
        return run.agent

    async def put(self, config: ServeConfig) -> bool:
        """Run the job's agent with ``config``; True when it was started (False: it ran so
        already). Other settings replace the running one (stopped first)."""
        async with self._lock(config.job):
            run = self.runs.get(config.job)
            if run is not None and run.config == config and not run.ended.is_set():
                return False
            if run is not None:
                await self._stop(config.job)
            run = SidecarRun(config, self.store)  # (closed by the host, at its end)
            token = JOB.set(config.job)  # its tasks log with the job's id
            try:
                await run.start()
            finally:
                JOB.reset(token)
            self.runs[config.job] = run
            watcher = asyncio.create_task(self._end_when_fenced(run))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            log.info("job %s: agent started (generation %d)", config.job, config.generation)
            return True

    async def remove(self, job: str) -> int | None:
        """Stop the job's agent; its exit status, or None when it had none here."""
        async with self._lock(job):
            return await self._stop(job)

    async def close(self) -> None:
        """Stop every job's agent (each ships what it has left), all at once."""
        await asyncio.gather(*(self.remove(job) for job in list(self.runs)))
        for watcher in list(self._watchers):
            watcher.cancel()

    async def _stop(self, job: str) -> int | None:
        run = self.runs.pop(job, None)
        if run is None:
            return None
        token = JOB.set(job)
        try:
            status = await run.stop()
        finally:
            JOB.reset(token)
        log.info("job %s: agent stopped (status %d)", job, status)
        return status

    async def _end_when_fenced(self, run: SidecarRun) -> None:
        await run.ended.wait()
        async with self._lock(run.config.job):
            if self.runs.get(run.config.job) is run:
                await self._stop(run.config.job)

    def _lock(self, job: str) -> asyncio.Lock:
        return self._locks.setdefault(job, asyncio.Lock())


def build_host_app(host: AgentHost, token: str | None) -> web.Application:
    """The host's API: its own endpoints want ``token`` (the host's, from the controller);
    each job's, the job's own."""
    async def healthz(_req: web.Request) -> web.Response:
        return _json({"status": "ok", "jobs": len(host.runs)})

    async def jobs(req: web.Request) -> web.Response:
        if not allowed(req, token):
            return refused(req)
        return _json({"jobs": [{"job": job, "pgdata": str(run.config.pgdata),
                                "generation": run.config.generation}
                               for job, run in sorted(host.runs.items())]})

    async def put(req: web.Request) -> web.Response:
        if not allowed(req, token):
            return refused(req)
        job = req.match_info["job"]
        try:
            config = config_from_json(job, await req.json())
            started = await host.put(config)
        except json.JSONDecodeError:
            return _json({"error": "expected a JSON object of agent settings"}, 400)
        except AgentError as exc:
            return _json({"error": one_line(exc)}, 409)
        return _json({"job": job, "started": started}, 201 if started else 200)

    async def delete(req: web.Request) -> web.Response:
        if not allowed(req, token):
            return refused(req)
        status = await host.remove(req.match_info["job"])
        if status is None:
            return _json({"error": f"job {req.match_info['job']} has no agent here"}, 404)
        return _json({"status": status})

    app = web.Application(client_max_size=2**20)
    app.add_routes([web.get("/healthz", healthz), web.get("/jobs", jobs),
                    web.put("/jobs/{job}", put), web.delete("/jobs/{job}", delete),
                    *routes("/jobs/{job}", lambda req: host.agent(req.match_info["job"]))])
    return app


class _JobTag(logging.Filter):
    """Prefix a line about one job's work with the job (many jobs share one log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = JOB.get()
        if job is not None and not getattr(record, "job_tagged", False):
            record.msg, record.job_tagged = f"[job {job}] {record.msg}", True
        return True


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body) + "\n",
                        content_type="application/json")


async def serve_host(store: Store, address: tuple[str, int], state: Path | None,
                     token: str | None) -> int:
    """Serve until SIGTERM or SIGINT; ``state`` gets ``{"pid", "port"}`` once listening.
    ``token``: what the host's own endpoints want (None: open, run by hand)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _watch_children_by_pidfd(loop)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_JobTag())
    host = AgentHost(store)
    runner = web.AppRunner(build_host_app(host, token), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, *address, shutdown_timeout=5)
        try:
            await site.start()
        except OSError as exc:
            raise AgentError(f"cannot listen on {address[0]}:{address[1]}: "
                             f"{exc.strerror}") from exc
        port = runner.addresses[0][1]
        if state is not None:
            _write_state(state, port)
        log.info("agent host listening on http://%s:%d (store %s)", address[0], port,
                 store.url)
        await stop.wait()
        log.info("stopping the agents of %d jobs", len(host.runs))
        await host.close()
        return 0
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await store.close()


def _watch_children_by_pidfd(loop: asyncio.AbstractEventLoop) -> None:
    """Python 3.11's default child watcher waits for each subprocess in a thread of its
    own: a host with 200 jobs had 200 threads waiting on their pg_receivewal. A pidfd
    watcher waits for them all in the event loop (Linux 5.3+; else the default stays)."""
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return  # 3.12 uses pidfds by itself
    try:
        watcher = asyncio.PidfdChildWatcher()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher.attach_loop(loop)
            asyncio.set_child_watcher(watcher)
    except (OSError, NotImplementedError, RuntimeError) as exc:
        log.warning("waiting for subprocesses with a thread each: %s", exc)


def _write_state(path: Path, port: int) -> None:
    import os
    import time

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": port,
                               "started_at": time.time()}) + "\n")
    os.replace(tmp, path)
