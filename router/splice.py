"""The spliced phase: bytes both ways, results never parsed nor touched by Python.

After the handshake each transport gets a ``Pipe`` as its protocol. A pipe's
``data_received`` *is* the peer transport's ``write``: uvloop caches that
bound method when the protocol is set and calls it from Cython on every
read, so relaying a message runs no Python bytecode at all. The one
exception is the client's direction of a session whose backend is to be
pooled: there ``data_received`` is a ``ClientFeed``, which reads one header
per message to keep the client's Terminate from the backend. Byte counts
come from the kernel (``tcp_info``), not from the hot path.

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

    def __init__(self, transport: asyncio.Transport,
                 on_lost: Callable[[Pipe], bool | None]) -> None:
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
        # The peer's socket is still open: on_lost can read its kernel counters, and keep
        # it open (a backend whose client left, to be reset and pooled: pool.py).
        if not self.on_lost(peer):
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


def _discard(data: bytes) -> None:
    pass


class ClientFeed:
    """The client-to-backend writer of a session whose backend may be pooled: it follows
    the client's message boundaries (a header per message: O(1) per chunk of a large
    message) so that a Terminate is seen exactly and never reaches the backend, which it
    would end. At a Terminate, ``on_terminate`` runs (the router closes the client, as
    PgBouncer does, and keeps the backend). A Python call per client chunk; the backend's
    direction stays a C-level write."""

    __slots__ = ("head", "left", "on_terminate", "write")

    def __init__(self, write: Callable[[bytes], None], on_terminate: Callable[[], None]) -> None:
        self.write = write
        self.on_terminate = on_terminate
        self.left = 0  # bytes of the current message still to come
        self.head = b""  # a message header cut by the chunk's end (held back)

    def __call__(self, data: bytes) -> None:
        n = len(data)
        if self.left >= n:  # inside a long message (COPY data): no parsing
            self.left -= n
            self.write(data)
            return
        if self.head:
            data, self.head = self.head + data, b""
            n = len(data)
        pos = self.left
        while pos < n:
            if pos + 5 > n:  # a header cut in two: hold it until it is whole
                self.head = data[pos:]
                data = data[:pos]
                break
            length = int.from_bytes(data[pos + 1:pos + 5])
            if data[pos] == 0x58 and length == 4:  # Terminate
                if pos:
                    self.write(data[:pos])
                self.left = 0
                self.on_terminate()
                return
            pos += 1 + length
        self.left = max(pos - n, 0)
        if data:
            self.write(data)


def splice(
    client: asyncio.Transport,
    backend: asyncio.Transport,
    on_lost: Callable[[Pipe], bool | None],
    feed: ClientFeed | None = None,
) -> tuple[Pipe, Pipe]:
    """Join two transports; ``on_lost(surviving_pipe)`` runs once when either side goes, and
    the survivor's transport is closed unless it returns True (then it is the caller's).
    ``feed`` (made with ``backend.write``) keeps a client's Terminate from the backend, for a
    backend that is to be pooled."""
    from_client = Pipe(client, on_lost)
    from_backend = Pipe(backend, on_lost)
    from_client.peer = from_backend
    from_backend.peer = from_client
    # Must be set before set_protocol: uvloop caches data_received there.
    from_client.data_received = feed or backend.write
    from_backend.data_received = client.write
    client.set_protocol(from_client)
    backend.set_protocol(from_backend)
    return from_client, from_backend
