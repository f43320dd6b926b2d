"""A minimal blocking PostgreSQL wire client: enough to send startup packets and read errors."""

from __future__ import annotations

import contextlib
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


class WireClient:
    """A logged-in connection that sends protocol messages one by one (SCRAM via scramp):
    for the exact answers of the extended protocol, which drivers never show."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, port: int, user: str, password: str, database: str) -> WireClient:
        from scramp import ScramClient

        sock = connect(port)
        sock.sendall(startup_packet({"user": user, "database": database}))
        scram = None
        while True:
            kind, body = read_message(sock)
            if kind == b"E":
                sock.close()
                raise AssertionError(f"login failed: {error_fields(body)}")
            if kind == b"Z":
                return cls(sock)
            if kind != b"R":
                continue
            (code,) = struct.unpack_from("!i", body)
            if code == 10:
                scram = ScramClient(["SCRAM-SHA-256"], user, password)
                first = scram.get_client_first().encode()
                sock.sendall(pmsg(b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            elif code == 11:
                assert scram is not None
                scram.set_server_first(body[4:].decode())
                sock.sendall(pmsg(scram.get_client_final().encode()))
            elif code == 12:
                assert scram is not None
                scram.set_server_final(body[4:].decode())

    def send(self, kind: bytes, body: bytes = b"") -> None:
        self.sock.sendall(kind + struct.pack("!I", len(body) + 4) + body)

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        """Every message up to and with the next ReadyForQuery (notices left out)."""
        got = []
        while True:
            kind, body = read_message(self.sock)
            if kind in (b"N", b"S"):
                continue
            got.append((kind, body))
            if kind == b"Z":
                return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(b"X")
        self.sock.close()
