"""A minimal blocking PostgreSQL wire client: enough to send startup packets and read errors."""

from __future__ import annotations

import socket
import struct

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST = struct.pack("!ii", 8, 80877103)

def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!i", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, length = struct.unpack("!cI", recv_exact(sock, 5))
    return kind, recv_exact(sock, length - 4)


def error_fields(body: bytes) -> dict[str, str]:
    return {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}


def read_error(sock: socket.socket) -> dict[str, str]:
    """Skip to the next ErrorResponse and return its fields."""
    while True:
        kind, body = read_message(sock)
        assert kind != b"Z", "got ReadyForQuery where an ErrorResponse was expected"
        if kind == b"E":
            return error_fields(body)


def pmsg(body: bytes) -> bytes:
    return b"p" + struct.pack("!I", len(body) + 4) + body


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.settimeout(15)
    return sock
