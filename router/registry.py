"""The routers of the fleet, registered in the catalog (PgBouncer's ``[peers]``, kept by
heartbeats instead of by hand).

A router that hears forwarded cancels (``--peer-listen``) registers the address its
peers reach it at (``--peer-advertise``, default the listen address) and renews it
every third of ``--lease-ttl``; each renewal answers with the other live routers'
addresses, which ``fleet.Peers`` asks about cancel keys nobody here issued. A router
that stops renewing is forgotten after ``--lease-ttl``. Static ``--peer`` names (a
headless Service) still work beside it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from jobmesh.errors import one_line

from .fleet import Peers

log = logging.getLogger(__name__)


class RegistryCatalog(Protocol):
    async def router_heartbeat(self, router_id: str, host: str, port: int,
                               ttl: float) -> list[tuple[str, int]]: ...


class Registry:
    def __init__(self, catalog: RegistryCatalog, me: str, address: tuple[str, int],
                 peers: Peers, ttl: float, errors: tuple[type[BaseException], ...]) -> None:
        self.catalog, self.me, self.address, self.peers = catalog, me, address, peers
        self.ttl = ttl
        self.errors: tuple[type[BaseException], ...] = (*errors, TimeoutError)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beating())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def beat(self) -> None:
        host, port = self.address
        try:
            async with asyncio.timeout(self.ttl / 3):
                others = await self.catalog.router_heartbeat(self.me, host, port, self.ttl)
        except self.errors as exc:
            log.warning("catalog: router registry not renewed: %s", one_line(exc))
            return  # (the peers known so far stay)
        if others != self.peers.registered:
            log.info("router peers from the catalog: %s",
                     ", ".join(f"{h}:{p}" for h, p in others) or "none")
        self.peers.registered = others

    async def _beating(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.ttl / 3)
