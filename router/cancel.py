"""Forwarding a client's CancelRequest to the backend that runs its query."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from . import peers
from . import protocol as pg
from .cancel_map import CancelMap
from .config import RouterConfig
from .inbox import ConnectionClosed, Inbox
from .metrics import RouterMetrics

log = logging.getLogger(__name__)


class Canceller:
    def __init__(self, cancel_map: CancelMap, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.cancel_map = cancel_map
        self.config = config
        self.metrics = metrics

    async def handle(self, pid: int, secret: int) -> None:
        owner = self.cancel_map.owner(pid)
        if owner != self.config.worker_index and self.config.control_dir is not None:
            try:
                await peers.forward_cancel(
                    self.config.control_dir, owner, pid, secret
                )
            except OSError as exc:
                self.metrics.cancels.labels("failed").inc()
                log.warning("cancel could not reach router worker %d: %s", owner, exc)
            return
        await self.cancel_here(pid, secret)

    async def cancel_here(self, pid: int, secret: int) -> None:
        target = self.cancel_map.lookup(pid, secret)
        if target is None:
            self.metrics.cancels.labels("unknown_key").inc()
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, backend = await loop.create_connection(Inbox, target.host, target.port)
                backend.write(pg.cancel_request(target.pid, target.secret))
                # Postgres closes the connection once it has read the request.
                with contextlib.suppress(ConnectionClosed):
                    await backend.read()
                backend.close()
        except (OSError, TimeoutError) as exc:
            self.metrics.cancels.labels("failed").inc()
            log.warning("cancel to %s:%s failed: %s", target.host, target.port, exc)
            return
        self.metrics.cancels.labels("forwarded").inc()


