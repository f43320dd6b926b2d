"""Byte counts and last-activity times read from the kernel (Linux ``TCP_INFO``).

Counting bytes in Python on every read would put a frame on the splice's hot
path. The kernel already counts them per socket, so the router asks it when
metrics are scraped and when a session ends, and the hot path stays empty.
"""

from __future__ import annotations

import asyncio
import socket
import struct

# struct tcp_info (include/uapi/linux/tcp.h): offsets are ABI-stable.
_LAST_DATA_RECV = struct.Struct("=I")  # ms since data last arrived, offset 52
_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received, offset 120
_TCP_INFO_LEN = 136


def socket_bytes(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """(bytes received from the peer, bytes sent to and acked by the peer), or None."""
    info = _tcp_info(transport)
    if info is None:
        return None
    acked, received = _BYTES.unpack_from(info, 120)
    return received, acked


def idle_ms(transport: asyncio.BaseTransport) -> int | None:
    """Milliseconds since the peer last sent data, or None."""
    info = _tcp_info(transport)
    if info is None:
        return None
    return _LAST_DATA_RECV.unpack_from(info, 52)[0]


def _tcp_info(transport: asyncio.BaseTransport) -> bytes | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    return info if len(info) >= _TCP_INFO_LEN else None
