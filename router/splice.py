"""The spliced phase: bytes both ways, never parsed, never touched by Python.

After the handshake each transport gets a ``Pipe`` as its protocol. A pipe's
``data_received`` *is* the peer transport's ``write``: uvloop caches that
bound method when the protocol is set and calls it from Cython on every
read, so relaying a message runs no Python bytecode at all. Byte counts come
from the kernel (``tcp_info``), not from the hot path.

Flow control couples the two sides: when a transport's write buffer passes
its high-water mark, its pipe gets ``pause_writing`` and stops reading on
the *other* transport until the buffer drains.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Pipe(asyncio.BaseProtocol):
    """The protocol of one spliced transport: an asyncio.Protocol in all but name.

    It derives from ``BaseProtocol`` (empty ``__slots__``, no methods that
    matter) rather than ``Protocol`` because its ``data_received`` is a slot
    holding the peer's ``write``, not a method to override.
    """

    __slots__ = ("data_received", "on_lost", "peer", "transport")

    def __init__(self, transport: asyncio.Transport, on_lost: Callable[[Pipe], None]) -> None:
        self.transport = transport
        self.peer: Pipe | None = None
        self.on_lost = on_lost
        self.data_received: Callable[[bytes], None] = _discard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol does not call it; present for the protocol interface

    def eof_received(self) -> bool:
        # The Postgres protocol has no half-close: EOF ends the session.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is None:
            return
        self.peer = None
        peer.peer = None
        self.data_received = peer.data_received = _discard
        # The peer's socket is still open: on_lost can read its kernel counters.
        self.on_lost(peer)
        peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


def _discard(data: bytes) -> None:
    pass


def splice(
    client: asyncio.Transport,
    backend: asyncio.Transport,
    on_lost: Callable[[Pipe], None],
) -> tuple[Pipe, Pipe]:
    """Join two transports; ``on_lost(surviving_pipe)`` runs once when either side goes."""
    from_client = Pipe(client, on_lost)
    from_backend = Pipe(backend, on_lost)
    from_client.peer = from_backend
    from_backend.peer = from_client
    # Must be set before set_protocol: uvloop caches data_received there.
    from_client.data_received = backend.write
    from_backend.data_received = client.write
    client.set_protocol(from_client)
    backend.set_protocol(from_backend)
    return from_client, from_backend
