"""A minimal asyncio Protocol for the handshake phase: buffer bytes, await them.

The handshake is written as a coroutine for readability; once it is over the
transport is handed to ``splice.Pipe`` and this object (and the coroutine)
are dropped, so an idle spliced session holds no coroutine frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ConnectionClosed(Exception):
    pass


class Inbox(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.on_made: Callable[[Inbox], None] | None = None
        # A CancelRequest's connection: never answered, EOF is all (libpq's cancel fails
        # with "unexpected response from server" on any byte, as PostgreSQL sends none).
        self.no_reply = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio types the argument as any BaseTransport; a stream server
        # hands a stream protocol a Transport.
        self.transport = transport  # type: ignore[assignment]
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """Whatever has arrived; raises ConnectionClosed at EOF with nothing buffered."""
        while not self._buf:
            if self.closed:
                raise ConnectionClosed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
