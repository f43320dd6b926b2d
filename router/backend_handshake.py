"""The router logging in to a job's Postgres: a sans-IO client handshake.

Handles every authentication a backend may ask for (trust, cleartext, md5,
SCRAM-SHA-256) and collects what must reach the client: ParameterStatus and
NoticeResponse messages are passed through verbatim, BackendKeyData is kept
for the cancel map, and ReadyForQuery ends the handshake.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from scramp import ScramClient, ScramException

from . import protocol as pg


class BackendAuthFailed(Exception):
    """The backend refused the router's own credentials (a route problem, not the client's)."""


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Relay:
    """A message to pass on to the client as-is (ParameterStatus, NoticeResponse)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class KeyData:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class BackendError:
    fields: dict[str, str]
    raw: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    status: bytes
    leftover: bytes


Event = Send | Relay | KeyData | BackendError | Ready


class State(enum.Enum):
    AUTHENTICATING = "authenticating"
    STARTING = "starting"  # auth done, reading parameters until ReadyForQuery
    READY = "ready"
    FAILED = "failed"


class BackendHandshake:
    def __init__(self, user: str, database: str, password: str | None,
                 options: Mapping[str, str]) -> None:
        self.state = State.AUTHENTICATING
        self._user = user
        self._password = password
        self._frames = pg.FrameBuffer()
        self._scram: ScramClient | None = None
        params = {"user": user, "database": database}
        params.update(options)
        self._startup = pg.startup_message(params)

    def startup_bytes(self) -> bytes:
        return self._startup

    def receive_data(self, data: bytes) -> None:
        self._frames.feed(data)

    def next_event(self) -> Event | None:
        if self.state in (State.READY, State.FAILED):
            raise RuntimeError(f"handshake already {self.state.value}")
        while True:
            msg = self._frames.next_message(pg.MAX_BACKEND_STARTUP_MESSAGE)
            if msg is None:
                return None
            event = self._process(msg)
            if event is not None:
                return event

    def _process(self, msg: pg.Message) -> Event | None:
        if msg.type == b"E":
            self.state = State.FAILED
            fields = pg.decode_fields(msg.body)
            raw = pg.message(msg.type, msg.body)
            if fields.get("C", "").startswith("28"):
                raise BackendAuthFailed(fields.get("M", "authentication failed"))
            return BackendError(fields, raw)
        if msg.type == b"N":
            return Relay(pg.message(msg.type, msg.body))
        if self.state is State.AUTHENTICATING:
            return self._process_authenticating(msg)
        return self._process_starting(msg)

    def _process_authenticating(self, msg: pg.Message) -> Event | None:
        if msg.type == b"v":
            return None  # NegotiateProtocolVersion: we asked for 3.0 only; nothing to do
        if msg.type != b"R":
            raise pg.ProtocolViolation(f"backend sent {msg.type!r} during authentication")
        code, payload = pg.decode_authentication(msg.body)
        if code == pg.AUTH_OK:
            self.state = State.STARTING
            return None
        if code == pg.AUTH_CLEARTEXT:
            return Send(pg.password_message(self._need_password().encode() + b"\0"))
        if code == pg.AUTH_MD5:
            return Send(pg.password_message(self._md5(payload[:4]) + b"\0"))
        if code == pg.AUTH_SASL:
            return Send(self._scram_first(pg.decode_sasl_mechanisms(payload)))
        if code == pg.AUTH_SASL_CONTINUE:
            return Send(self._scram_final(payload))
        if code == pg.AUTH_SASL_FINAL:
            self._scram_verify(payload)
            return None
        raise BackendAuthFailed(f"backend asked for unsupported authentication method {code}")

    def _process_starting(self, msg: pg.Message) -> Event | None:
        if msg.type == b"S":
            return Relay(pg.message(msg.type, msg.body))
        if msg.type == b"K":
            return KeyData(*pg.decode_backend_key_data(msg.body))
        if msg.type == b"Z":
            self.state = State.READY
            return Ready(msg.body[:1] or b"I", self._frames.take_all())
        raise pg.ProtocolViolation(f"backend sent {msg.type!r} before ReadyForQuery")

    def _need_password(self) -> str:
        if self._password is None:
            raise BackendAuthFailed("backend asked for a password but the route has none")
        return self._password

    def _md5(self, salt: bytes) -> bytes:
        inner = hashlib.md5((self._need_password() + self._user).encode()).hexdigest()
        return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()

    def _scram_first(self, mechanisms: list[str]) -> bytes:
        # The router's backend link is plain TCP on a trusted network, so no -PLUS.
        offered = [m for m in mechanisms if m == "SCRAM-SHA-256"]
        if not offered:
            raise BackendAuthFailed(f"backend offers no usable SASL mechanism: {mechanisms}")
        try:
            self._scram = ScramClient(offered, self._user, self._need_password())
            first = self._scram.get_client_first().encode()
        except ScramException as exc:
            raise BackendAuthFailed(f"cannot start SCRAM with the route's password: {exc}") from exc
        return pg.sasl_initial_response(offered[0], first)

    def _scram_final(self, payload: bytes) -> bytes:
        if self._scram is None:
            raise pg.ProtocolViolation("SASLContinue before SASL started")
        try:
            self._scram.set_server_first(payload.decode())
            return pg.password_message(self._scram.get_client_final().encode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise BackendAuthFailed(f"SCRAM with the backend failed: {exc}") from exc

    def _scram_verify(self, payload: bytes) -> None:
        if self._scram is None:
            raise pg.ProtocolViolation("SASLFinal before SASL started")
        try:
            self._scram.set_server_final(payload.decode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise BackendAuthFailed(f"backend's SCRAM signature is wrong: {exc}") from exc
