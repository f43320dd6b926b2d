"""``agent serve``: run the sidecar beside one job's PostgreSQL until SIGTERM or SIGINT.

The job's work is a ``SidecarRun`` (``run.py``); this adds the HTTP API in
front of it and the signals that end it. Once fenced off it exits with
status 3 (``run.FENCED``). The command line that calls ``serve`` is in
``jobmesh.agent.cli.serve``; the local backend runs its jobs' agents in one
process instead (``host.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from ..errors import AgentError
from ..store import Store
from .api import build_app
from .daemon import ServeConfig
from .run import FENCED, SidecarRun

__all__ = ["FENCED", "serve"]

log = logging.getLogger("jobmesh.agent.serve")


async def serve(config: ServeConfig, store: Store, host: str, port: int) -> int:
    """Run until SIGTERM or SIGINT (or fenced off); returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = SidecarRun(config, store)
    runner: web.AppRunner | None = None
    try:
        agent = await run.start()
        runner = web.AppRunner(build_app(agent), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, shutdown_timeout=5)
        try:
            await site.start()
        except OSError as exc:
            await run.stop()
            raise AgentError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        bound = runner.addresses[0]
        log.info("agent listening on http://%s:%d (job %s, store %s)", bound[0], bound[1],
                 config.job, store.url)
        ended = asyncio.create_task(run.ended.wait())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([ended, stopped], return_when=asyncio.FIRST_COMPLETED)
        for t in (ended, stopped):
            t.cancel()
        return await run.stop()
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await run.store.close()
