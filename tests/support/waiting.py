"""The one ``until``: await a condition against a deadline, failing with what was awaited.

For conditions nothing announces (a file appearing, a process gone, a counter in an
HTTP status). Where an event exists (a log line, a NOTIFY, a future) await that instead.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T] | T], what: str, timeout: float = 120,
                interval: float = 0.05) -> T:
    """Call ``check`` (sync or async) every ``interval`` seconds until it returns something
    truthy, and return that; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
