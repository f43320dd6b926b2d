"""Holding an authenticated client while its job wakes.

The client has its AuthenticationOk and waits for ReadyForQuery, which may
take a while (a restore). Reading stays on meanwhile, so a client that hangs
up is noticed at once and stops counting as a waiter; whatever it sends in
the meantime (a pipelining client's first query) is kept, up to
``MAX_HELD_BYTES``, for the backend. Past that the socket is paused as it
is during a backend login, and the kernel holds the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from .inbox import Inbox

MAX_HELD_BYTES = 64 * 1024
# A held client's backend (its job not answering) is tried again after this long,
# doubling up to the second, s.
HOLD_RETRY = (0.05, 0.5)

T = TypeVar("T")


async def hold(inbox: Inbox, waiting: Awaitable[T]) -> tuple[T, bytes]:
    """``waiting``'s result and the bytes the client sent meanwhile.

    Raises ``ConnectionClosed`` (abandoning the wait) when the client hangs up.
    """
    wait = asyncio.ensure_future(waiting)
    kept = bytearray()
    read: asyncio.Future[bytes] | None = None
    try:
        while True:
            if read is None and len(kept) < MAX_HELD_BYTES:
                read = asyncio.ensure_future(inbox.read())
            elif read is None and inbox.transport is not None:
                inbox.transport.pause_reading()
            await asyncio.wait([f for f in (wait, read) if f is not None],
                               return_when=asyncio.FIRST_COMPLETED)
            if read is not None and read.done():
                kept += read.result()  # ConnectionClosed: the client is gone
                read = None
            if wait.done():
                return wait.result(), bytes(kept)
    finally:
        for f in (wait, read):
            if f is None:
                continue
            if not f.done():
                f.cancel()
            elif not f.cancelled():
                f.exception()  # retrieved: the client is gone, nobody else will look
