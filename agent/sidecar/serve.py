"""``agent serve``: run the sidecar beside a job's PostgreSQL until SIGTERM or SIGINT.

Starts the HTTP API, the archiver, the WAL streamer, the base backup
schedule and the reading of the job's history from the store; at the end it
ships the streamed WAL and drains the spool one last time, so a clean stop
leaves no WAL behind that the store lacks. The
command line that calls ``serve`` is in ``jobmesh.agent.cli.serve``.

With a generation, the agent claims it in the store before anything else and
writes through a ``FencedStore``: once a newer incarnation of the job claims
the store, this one stops its PostgreSQL at once (an immediate shutdown: no
more commits it could not keep) and exits with status 3 (``fence.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable
from pathlib import Path

import asyncpg
from aiohttp import web

from jobmesh.errors import one_line

from ..errors import AgentError
from ..fence import Fenced, FencedStore, claim
from ..metrics import AgentMetrics
from ..postmaster import pg_isready, read_postmaster
from ..store import Store
from ..store.counting import CountingStore
from .api import build_app
from .daemon import Agent, Conflict, ServeConfig

log = logging.getLogger("jobmesh.agent.serve")

FENCED = 3  # exit status of an agent a newer generation fenced off


async def serve(config: ServeConfig, store: Store, host: str, port: int) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = AgentMetrics()
    store = CountingStore(store, metrics.count_request)
    fenced: list[Fenced] = []
    if config.generation:
        try:
            await claim(store, config.job, config.generation)
        except Fenced as exc:
            await store.close()
            raise AgentError(str(exc)) from None

        def on_fenced(exc: Fenced) -> None:
            fenced.append(exc)
            _stop_postgres_now(config.pgdata)
            stop.set()

        store = FencedStore(store, config.job, config.generation,
                            interval=config.fence_interval, on_fenced=on_fenced)
    agent = Agent(config, store, metrics)
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
        streaming = (asyncio.create_task(agent.streamer.run(stop), name="wal-stream")
                     if agent.streamer is not None else None)
        background = [asyncio.create_task(agent.schedule_base_backups(), name="schedule"),
                      asyncio.create_task(agent.watch_position(), name="wal-position"),
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
        if streaming is not None:
            await streaming  # it ships what it received one last time
        if fenced:
            log.error("stopped, fenced off: %s", fenced[0])
            return FENCED
        try:
            drained = await agent.archiver.drain()
        except Exception as exc:
            log.error("final WAL drain failed, the spool keeps the files: %s", one_line(exc))
            return 1
        log.info("stopped (%d WAL files shipped in the final drain)", drained)
        return 0
    finally:
        await runner.cleanup()
        await store.close()


def _stop_postgres_now(pgdata: Path) -> None:
    """Immediate shutdown (SIGQUIT): a fenced incarnation must not acknowledge another
    commit, since nothing it writes from now on reaches the store."""
    pm = read_postmaster(pgdata)
    if pm is not None:
        log.error("stopping PostgreSQL (pid %d) at once: fenced off", pm.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pm.pid, signal.SIGQUIT)


async def arm_archive_timeout(agent: Agent, stop: asyncio.Event) -> None:
    """Reload Postgres's configuration whenever a new postmaster accepts connections.

    PostgreSQL 15's checkpointer computes its first sleep while the startup
    process still runs, ignoring archive_timeout, and then sleeps a whole
    checkpoint_timeout: until a reload, archive_timeout would not bound the
    data a crash can lose. A server restarted under this agent (crash recovery
    in place) needs the reload again, so this runs until the agent stops.
    """
    armed: int | None = None  # the postmaster pid last reloaded
    while not stop.is_set():
        pm = read_postmaster(agent.config.pgdata)
        if pm is not None and pm.pid != armed:
            with contextlib.suppress(Conflict, OSError, TimeoutError, asyncpg.PostgresError):
                dsn = agent.dsn()
                if await pg_isready(dsn):
                    conn = await asyncpg.connect(dsn, timeout=10)
                    try:
                        await conn.execute("select pg_reload_conf()")
                    finally:
                        await conn.close()
                    armed = pm.pid
        # Shortly while a server is coming up; once armed, a look a second is enough.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2 if armed is None else 1.0)


async def _quietly(what: str, coro: Awaitable[None]) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("%s failed: %s", what, one_line(exc))
