"""Sans-IO codec for the PostgreSQL v3 wire protocol, as far as a router needs it.

Bytes in, typed messages out; messages in, bytes out. Nothing here touches a
socket or an event loop, so every rule can be tested with plain bytes (see
tests/test_protocol.py) and fuzzed with hypothesis.

The router parses only the startup phase. After ``ReadyForQuery`` the
connection is spliced and never parsed again, so this module stays small.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Postgres caps the first packet at 10,000 bytes (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
# Authentication messages are small; anything larger is an attack or a bug.
MAX_AUTH_MESSAGE = 65_536
# Backend messages seen during startup (errors, notices, parameters) are small too.
MAX_BACKEND_STARTUP_MESSAGE = 1 << 20

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = 3 << 16 | 2  # PostgreSQL 18: cancel keys of 4 to 256 bytes (3.0: exactly 4)
MIN_CANCEL_KEY = 4
MAX_CANCEL_KEY = 256
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")


class ProtocolViolation(Exception):
    """The peer sent bytes that are not valid protocol (SQLSTATE 08P01)."""


# --- messages a client sends before it is spliced ---------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes  # 4 bytes (protocol 3.0), up to 256 (3.2)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)


FirstPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


@dataclass(frozen=True, slots=True)
class Message:
    """A typed message: one type byte and its body (length stripped)."""

    type: bytes
    body: bytes


# --- framing -----------------------------------------------------------------


class FrameBuffer:
    """Accumulates bytes and cuts them into packets.

    Startup packets carry no type byte; all later messages do. The size cap
    is checked as soon as a length is known, so a peer cannot make us buffer
    more than ``max_size`` bytes by announcing a huge packet.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_all(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_startup_packet(self, max_size: int = MAX_STARTUP_PACKET) -> bytes | None:
        """The next untyped packet's payload (after its length), or None if incomplete."""
        if len(self._buf) < 4:
            return None
        (length,) = _I32.unpack_from(self._buf)
        if length < 8 or length > max_size:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        payload = bytes(self._buf[4:length])
        del self._buf[:length]
        return payload

    def next_message(self, max_size: int) -> Message | None:
        """The next typed message, or None if incomplete."""
        if len(self._buf) < 5:
            return None
        kind, length = _HEADER.unpack_from(self._buf)
        if length < 4 or length > max_size:
            raise ProtocolViolation(f"invalid length {length} for message type {kind!r}")
        if len(self._buf) < length + 1:
            return None
        body = bytes(self._buf[5 : length + 1])
        del self._buf[: length + 1]
        return Message(kind, body)


def decode_first_packet(payload: bytes) -> FirstPacket:
    """Decode the payload of a client's first (untyped) packet."""
    if len(payload) < 4:
        raise ProtocolViolation("startup packet too short")
    (code,) = _I32.unpack_from(payload)
    if code == SSL_REQUEST_CODE:
        _expect_len(payload, 4, "SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        _expect_len(payload, 4, "GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 8 + MIN_CANCEL_KEY <= len(payload) <= 8 + MAX_CANCEL_KEY:
            raise ProtocolViolation(f"CancelRequest has {len(payload)} bytes, expected "
                                    f"{8 + MIN_CANCEL_KEY} to {8 + MAX_CANCEL_KEY}")
        (pid,) = _U32.unpack_from(payload, 4)
        return CancelRequest(pid, payload[8:])
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}")
    return StartupMessage(major, minor, _decode_params(payload[4:]))


def _expect_len(payload: bytes, n: int, what: str) -> None:
    if len(payload) != n:
        raise ProtocolViolation(f"{what} has {len(payload)} bytes, expected {n}")


def _decode_params(data: bytes) -> dict[str, str]:
    # name\0value\0 ... \0 -- the final byte is the list terminator, as Postgres insists.
    if not data.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    pairs = data[:-1]
    if not pairs:
        return {}
    if not pairs.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = pairs[:-1].split(b"\0")
    if len(parts) % 2:
        raise ProtocolViolation("startup parameter without a value")
    params: dict[str, str] = {}
    for key, value in zip(parts[::2], parts[1::2], strict=True):
        if not key:
            raise ProtocolViolation("empty startup parameter name")
        try:
            params[key.decode()] = value.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("startup parameter is not valid UTF-8") from exc
    return params


def decode_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: mechanism name, then Int32 length (-1: none) and data."""
    end = body.find(b"\0")
    if end < 0 or len(body) < end + 5:
        raise ProtocolViolation("malformed SASLInitialResponse")
    mechanism = body[:end].decode("ascii", "replace")
    (length,) = _I32.unpack_from(body, end + 1)
    data = body[end + 5 :]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ProtocolViolation("SASLInitialResponse length mismatch")
    return mechanism, data


def decode_password(body: bytes) -> str:
    if not body.endswith(b"\0"):
        raise ProtocolViolation("password message is not terminated")
    try:
        return body[:-1].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("password is not valid UTF-8") from exc


# --- messages from a backend during its startup ------------------------------

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def decode_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolViolation("authentication message too short")
    (code,) = _I32.unpack_from(body)
    return code, body[4:]


def decode_sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode("ascii", "replace") for m in data.split(b"\0") if m]


def decode_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    parts = body.split(b"\0")
    if len(parts) < 3:
        raise ProtocolViolation("malformed ParameterStatus")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def decode_backend_key_data(body: bytes) -> tuple[int, bytes]:
    if not 4 + MIN_CANCEL_KEY <= len(body) <= 4 + MAX_CANCEL_KEY:
        raise ProtocolViolation("malformed BackendKeyData")
    (pid,) = _U32.unpack_from(body)
    return pid, body[4:]


# --- encoders -----------------------------------------------------------------


def message(kind: bytes, body: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(body) + 4) + body


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + payload)


def auth_ok() -> bytes:
    return authentication(AUTH_OK)


def auth_cleartext() -> bytes:
    return authentication(AUTH_CLEARTEXT)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return authentication(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return authentication(AUTH_SASL_FINAL, data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(b"K", _U32.pack(pid) + secret)


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def negotiate_protocol_version(version: int, unsupported: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion. Postgres sends the full newest version code
    (``3 << 16 | minor``), not the bare minor the docs describe; libpq 18 reads it so."""
    names = list(unsupported)
    body = _I32.pack(version) + _I32.pack(len(names)) + b"".join(_cstr(n) for n in names)
    return message(b"v", body)


def _notice_body(
    severity: str, sqlstate: str, text: str, hint: str | None, detail: str | None
) -> bytes:
    parts = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(sqlstate)]
    parts.append(b"M" + _cstr(text))
    if detail:
        parts.append(b"D" + _cstr(detail))
    if hint:
        parts.append(b"H" + _cstr(hint))
    return b"".join(parts) + b"\0"


def error_response(
    sqlstate: str,
    text: str,
    hint: str | None = None,
    *,
    detail: str | None = None,
    severity: str = "FATAL",
) -> bytes:
    return message(b"E", _notice_body(severity, sqlstate, text, hint, detail))


def notice_response(text: str, hint: str | None = None, *, sqlstate: str = "00000") -> bytes:
    return message(b"N", _notice_body("NOTICE", sqlstate, text, hint, None))


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0)
    body += b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    return struct.pack("!iiI", 12 + len(secret), CANCEL_REQUEST_CODE, pid) + secret


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def terminate() -> bytes:
    return message(b"X")


def query(sql: str) -> bytes:
    """A simple-protocol Query."""
    return message(b"Q", _cstr(sql))
