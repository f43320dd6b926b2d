"""Many routers as one: a CancelRequest that reached a router which did not issue its
key is forwarded to the router's peers, over an authenticated channel.

Two or more routers behind one address (a Kubernetes Service, a load balancer)
see a client's cancel land on any of them. A key names no router
(``cancel_map.py``), so a router that knows a key neither here nor in its
sibling workers asks every peer (``--peer HOST:PORT``, each name resolved
on every ask, so a headless Service's name means all its pods: PgBouncer's
``[peers]``, found by DNS). The peer that issued the key forwards the cancel.

The peer port must not become a way to cancel anyone's query, so every
request carries an HMAC-SHA256 under a secret all routers of the fleet share
(``--peer-secret-file``), a timestamp and a nonce: a request without a valid
MAC, older than ``MAX_SKEW`` or seen before is refused. A peer never forwards
a forwarded cancel again (no loops), and the rate limit of misses applies
where the client's request arrived (``cancel.py``).

Wire format (TCP, one request per connection)::

    request: b"JMC1" | ms since the epoch (u64) | nonce (16) | pid (u32)
             | secret length (u16) | secret | HMAC-SHA256 of all before (32)
    answer:  b"1" (the key was this router's: cancel forwarded), b"0" (not
             this router's), b"!" (refused: bad MAC, stale or replayed)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from . import protocol as pg
from .metrics import RouterMetrics

log = logging.getLogger(__name__)

MAGIC = b"JMC1"
_HEAD = struct.Struct("!4sQ16sIH")
_MAC = 32
MAX_SKEW = 30.0  # s: a request older (or newer) than this is refused
RESOLVE_EVERY = 5.0  # s: a peer name is resolved again after this long


class PeerAuth:
    """Signs and checks peer requests under the fleet's shared secret."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the peer secret must be at least 16 bytes")
        self._key = key
        self._seen: dict[bytes, float] = {}  # nonce -> when it was seen

    def sign(self, pid: int, secret: bytes, now: float | None = None) -> bytes:
        ms = int((time.time() if now is None else now) * 1000)
        body = _HEAD.pack(MAGIC, ms, secrets.token_bytes(16), pid, len(secret)) + secret
        return body + hmac.new(self._key, body, hashlib.sha256).digest()

    def check(self, body: bytes, mac: bytes, now: float | None = None) -> tuple[int, bytes]:
        """(pid, secret) of a request that is genuine, fresh and new; else ValueError."""
        if not hmac.compare_digest(hmac.new(self._key, body, hashlib.sha256).digest(), mac):
            raise ValueError("bad MAC")
        _, ms, nonce, pid, _ = _HEAD.unpack_from(body)
        now = time.time() if now is None else now
        if abs(now - ms / 1000) > MAX_SKEW:
            raise ValueError(f"stale by {now - ms / 1000:.0f} s")
        self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * MAX_SKEW}
        if nonce in self._seen:
            raise ValueError("replayed")
        self._seen[nonce] = now
        return pid, body[_HEAD.size:]


async def serve_peers(host: str, port: int, auth: PeerAuth,
                      on_cancel: Callable[[int, bytes], Awaitable[bool]],
                      metrics: RouterMetrics, timeout: float = 10.0) -> asyncio.Server:
    """Answer peers' forwarded cancels (every worker binds the port: SO_REUSEPORT)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(timeout):
                head = await reader.readexactly(_HEAD.size)
                magic, _, _, _, length = _HEAD.unpack(head)
                if magic != MAGIC or not pg.MIN_CANCEL_KEY <= length <= pg.MAX_CANCEL_KEY:
                    raise ValueError("not a peer request")
                body = head + await reader.readexactly(length)
                pid, secret = auth.check(body, await reader.readexactly(_MAC))
                matched = await on_cancel(pid, secret)
            writer.write(b"1" if matched else b"0")
            await writer.drain()
        except ValueError as exc:
            metrics.cancels.labels("peer_refused").inc()
            log.warning("refused a cancel from peer %s: %s",
                        writer.get_extra_info("peername"), exc)
            with contextlib.suppress(ConnectionError):
                writer.write(b"!")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_port=True)


class Peers:
    """The other routers of the fleet, asked when a cancel's key is unknown here."""

    def __init__(self, names: list[tuple[str, int]], auth: PeerAuth,
                 own: tuple[str, int] | None = None, timeout: float = 10.0) -> None:
        self.names = names
        self.auth = auth
        self.own = own  # this router's peer address: never asked
        self.timeout = timeout
        self._resolved: list[tuple[str, int]] = []
        self._resolved_at = -RESOLVE_EVERY
        # What the catalog's registry says (registry.py), beside the names given.
        self.registered: list[tuple[str, int]] = []

    async def addresses(self) -> list[tuple[str, int]]:
        now = time.monotonic()
        if now - self._resolved_at >= RESOLVE_EVERY:
            loop = asyncio.get_running_loop()
            found: set[tuple[str, int]] = set()
            for host, port in self.names:
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError as exc:
                    log.warning("cannot resolve router peer %s:%d: %s", host, port, exc)
                    continue
                found |= {(str(info[4][0]), int(info[4][1])) for info in infos}
            self._resolved = sorted(found - ({self.own} if self.own else set()))
            self._resolved_at = now
        if not self.registered:
            return self._resolved
        return sorted(set(self._resolved) | set(self.registered))

    async def ask(self, pid: int, secret: bytes) -> bool:
        """Forward to every peer at once; True if one of them had issued the key."""
        async def one(host: str, port: int) -> bool:
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(host, port)
                    try:
                        writer.write(self.auth.sign(pid, secret))
                        await writer.drain()
                        answer = await reader.read(1)
                    finally:
                        writer.close()
            except (OSError, TimeoutError) as exc:
                log.warning("cancel could not reach router peer %s:%d: %s", host, port, exc)
                return False
            if answer == b"!":
                log.warning("router peer %s:%d refused a forwarded cancel (its peer secret "
                            "is not ours?)", host, port)
            return answer == b"1"

        return any(await asyncio.gather(*(one(h, p) for h, p in await self.addresses())))
