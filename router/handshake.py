"""The client-facing startup handshake as an explicit state machine.

States, in the order a client walks them::

    FIRST_PACKET --SSLRequest--> (TLS or 'N') --> FIRST_PACKET (no 2nd SSLRequest)
    FIRST_PACKET --GSSENCRequest--> 'N' --> FIRST_PACKET
    FIRST_PACKET --CancelRequest--> CLOSED
    FIRST_PACKET --StartupMessage--> AUTHENTICATING --p...--> READY

Feed bytes with ``receive_data``; pull events with ``next_event``. Decisions
(is there a certificate, which credential, did auth succeed) belong to the
caller; this class only enforces what may arrive when. It never does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import protocol as pg


class State(enum.Enum):
    FIRST_PACKET = "first_packet"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A ``p`` message: its meaning depends on the request the router sent."""

    body: bytes


@dataclass(frozen=True, slots=True)
class Terminated:
    """The client sent Terminate (or hung up politely) during the handshake."""


Event = pg.FirstPacket | AuthResponse | Terminated


class ClientHandshake:
    def __init__(self) -> None:
        self.state = State.FIRST_PACKET
        self._frames = pg.FrameBuffer()
        self._ssl_requested = False
        self._gss_requested = False

    def receive_data(self, data: bytes) -> None:
        self._frames.feed(data)

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed.

        Raises ``ProtocolViolation`` for anything a well-behaved client would
        not send in the current state.
        """
        if self.state is State.FIRST_PACKET:
            return self._process_first_packet()
        if self.state is State.AUTHENTICATING:
            return self._process_authenticating()
        raise pg.ProtocolViolation(f"no more handshake input expected in state {self.state.value}")

    def _process_first_packet(self) -> Event | None:
        payload = self._frames.next_startup_packet()
        if payload is None:
            return None
        packet = pg.decode_first_packet(payload)
        if isinstance(packet, pg.SSLRequest):
            if self._ssl_requested:
                raise pg.ProtocolViolation("duplicate SSLRequest")
            self._ssl_requested = True
        elif isinstance(packet, pg.GSSENCRequest):
            if self._gss_requested or self._ssl_requested:
                raise pg.ProtocolViolation("unexpected GSSENCRequest")
            self._gss_requested = True
        elif isinstance(packet, pg.CancelRequest):
            self.state = State.CLOSED
        else:
            self.state = State.AUTHENTICATING
        return packet

    def _process_authenticating(self) -> Event | None:
        msg = self._frames.next_message(pg.MAX_AUTH_MESSAGE)
        if msg is None:
            return None
        if msg.type == b"p":
            return AuthResponse(msg.body)
        if msg.type == b"X":
            self.state = State.CLOSED
            return Terminated()
        raise pg.ProtocolViolation(f"expected a password response, got message type {msg.type!r}")

    def has_buffered_data(self) -> bool:
        """True when bytes arrived that no event consumed yet.

        After answering ``S`` to an SSLRequest this must be False: bytes sent
        before the TLS handshake were not encrypted and must not be trusted
        (CVE-2021-23214).
        """
        return len(self._frames) > 0

    def authenticated(self) -> bytes:
        """Mark authentication done; returns any bytes the client already pipelined."""
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError(f"cannot finish authentication in state {self.state.value}")
        self.state = State.READY
        return self._frames.take_all()
