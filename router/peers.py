"""Talking to sibling worker processes over Unix sockets in a control directory.

Each worker serves ``<dir>/w<i>.sock``. Two requests exist:

- ``C`` + pid (4 bytes) + the secret's length (2) + the secret: a
  CancelRequest that reached another worker, which did not issue its key.
  The answer is one byte: ``1`` if this worker issued the key (and forwarded
  the cancel), ``0`` if not.
- ``M``: the worker's Prometheus exposition, for the supervisor to merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

_KEY = struct.Struct("!IH")


def control_path(directory: str | Path, worker: int) -> Path:
    return Path(directory) / f"w{worker}.sock"


async def serve_control(
    directory: str | Path,
    worker: int,
    on_cancel: Callable[[int, bytes], Awaitable[bool]],
    metrics_text: Callable[[], bytes],
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind = await reader.readexactly(1)
            if kind == b"C":
                pid, length = _KEY.unpack(await reader.readexactly(_KEY.size))
                matched = await on_cancel(pid, await reader.readexactly(length))
                writer.write(b"1" if matched else b"0")
                await writer.drain()
            elif kind == b"M":
                writer.write(metrics_text())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    path = control_path(directory, worker)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return await asyncio.start_unix_server(handle, path)


async def forward_cancel(directory: str | Path, worker: int, pid: int, secret: bytes) -> bool:
    """Ask ``worker`` to forward a cancel; True if it had issued the key."""
    reader, writer = await asyncio.open_unix_connection(control_path(directory, worker))
    try:
        writer.write(b"C" + _KEY.pack(pid, len(secret)) + secret)
        await writer.drain()
        return await reader.readexactly(1) == b"1"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def fetch_metrics(directory: str | Path, worker: int, timeout: float = 5.0) -> str:
    """Blocking: called from the supervisor's metrics HTTP thread."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(control_path(directory, worker)))
        s.sendall(b"M")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
