"""One job's sidecar work, from its claim to its final WAL drain, without the HTTP layer.

``agent serve`` (one job, the Kubernetes sidecar) runs one of these behind
its own HTTP server; the local agent host (``host.py``) runs one per local
job behind a single server. A run claims its generation in the store (when
it has one) and writes through a ``FencedStore``; starts the archiver, the
WAL streamer, the base backup schedule, the watch of the server's position
and the reading of the job's history; and on ``stop`` ships the streamed WAL
and drains the spool one last time, so a clean stop leaves no WAL behind
that the store lacks. Once fenced off (a newer incarnation claimed the
store), it stops its PostgreSQL at once (an immediate shutdown: no more
commits it could not keep) and sets ``ended``; ``stop`` then answers
``FENCED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable
from pathlib import Path

from jobmesh.errors import one_line

from ..errors import AgentError
from ..fence import Fenced, FencedStore, claim
from ..metrics import AgentMetrics
from ..postmaster import pg_isready, read_postmaster
from ..store import Store
from ..store.counting import CountingStore
from .daemon import Agent, Conflict, ServeConfig

log = logging.getLogger("jobmesh.agent.serve")

FENCED = 3  # exit status of an agent a newer generation fenced off
# s between looks at the spool for finished segments: the WAL streamer ships the segment
# being written every window, so a second is soon enough, and a host with 200 jobs looked
# 1,000 times a second at 0.2.
SPOOL_POLL = 1.0


class SidecarRun:
    """The background work of one job's agent; ``start`` it, then ``stop`` it once."""

    def __init__(self, config: ServeConfig, store: Store) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.store: Store = CountingStore(store, self.metrics.count_request)
        self.fenced: Fenced | None = None
        self.ended = asyncio.Event()  # set once the run must end on its own (fenced off)
        self._stop = asyncio.Event()
        self._agent: Agent | None = None
        self._background: list[asyncio.Task[None]] = []
        self._shipping: list[asyncio.Task[None]] = []

    @property
    def agent(self) -> Agent:
        assert self._agent is not None, "the run has not started"
        return self._agent

    async def start(self) -> Agent:
        """Claim the generation (``AgentError`` when a newer one holds the store) and
        start the background work."""
        config = self.config
        if config.generation:
            try:
                await claim(self.store, config.job, config.generation)
            except Fenced as exc:
                raise AgentError(str(exc)) from None
            self.store = FencedStore(self.store, config.job, config.generation,
                                     interval=config.fence_interval, on_fenced=self._on_fenced)
        agent = self._agent = Agent(config, self.store, self.metrics)
        self._shipping.append(asyncio.create_task(
            agent.archiver.run(self._stop, interval=SPOOL_POLL), name=f"archiver-{config.job}"))
        if agent.streamer is not None:
            self._shipping.append(asyncio.create_task(agent.streamer.run(self._stop),
                                                      name=f"wal-stream-{config.job}"))
        self._background = [
            asyncio.create_task(agent.schedule_base_backups(), name=f"schedule-{config.job}"),
            asyncio.create_task(agent.watch_position(), name=f"wal-position-{config.job}"),
            asyncio.create_task(_quietly("reading the store", agent.load_history())),
            asyncio.create_task(_quietly("arming archive_timeout",
                                         arm_archive_timeout(agent, self._stop)))]
        return agent

    def _on_fenced(self, exc: Fenced) -> None:
        self.fenced = exc
        _stop_postgres_now(self.config.pgdata)
        self.ended.set()

    async def stop(self) -> int:
        """Finish a pause in progress, ship what is left, and say how it ended: 0, 1 (the
        final drain failed: the spool keeps the files) or ``FENCED``."""
        log.info("stopping: final WAL drain")
        self._stop.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._agent is None:
            return 0
        await self._agent.shutdown()
        for task in self._shipping:
            await task  # the streamer ships what it received one last time
        if self.fenced is not None:
            log.error("stopped, fenced off: %s", self.fenced)
            return FENCED
        try:
            drained = await self._agent.archiver.drain()
        except Exception as exc:
            log.error("final WAL drain failed, the spool keeps the files: %s", one_line(exc))
            return 1
        log.info("stopped (%d WAL files shipped in the final drain)", drained)
        return 0


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
    import asyncpg

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
        # Shortly while a server is coming up; once armed, a look every 5 s is enough.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2 if armed is None else 5.0)


async def _quietly(what: str, coro: Awaitable[None]) -> None:
    try:
        await coro
    except Exception as exc:
        log.warning("%s failed: %s", what, one_line(exc))
