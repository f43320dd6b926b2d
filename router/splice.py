"""The spliced phase: bytes both ways, never parsed.

After the handshake each transport gets a ``Pipe`` as its protocol. A pipe
writes whatever its transport receives to the peer transport and counts
bytes; that is the whole hot path. Flow control couples the two: when a
peer's write buffer passes its high-water mark, the peer's pipe gets
``pause_writing`` and stops reading on *this* side until it drains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Pipe(asyncio.Protocol):
    __slots__ = ("nbytes", "on_lost", "peer", "transport")

    def __init__(self, transport: asyncio.Transport, on_lost: Callable[[], None]) -> None:
        self.transport = transport
        self.peer: Pipe | None = None
        self.nbytes = 0
        self.on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]
        self.nbytes += len(data)

    def eof_received(self) -> bool:
        # The Postgres protocol has no half-close: EOF ends the session.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None:
            self.peer = None
            peer.peer = None
            peer.transport.close()
            self.on_lost()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


def splice(
    client: asyncio.Transport,
    backend: asyncio.Transport,
    on_lost: Callable[[], None],
) -> tuple[Pipe, Pipe]:
    """Join two transports; ``on_lost`` runs once when either side goes away."""
    from_client = Pipe(client, on_lost)
    from_backend = Pipe(backend, on_lost)
    from_client.peer = from_backend
    from_backend.peer = from_client
    client.set_protocol(from_client)
    backend.set_protocol(from_backend)
    return from_client, from_backend
