"""A ledger of acknowledged commits: what a crash test checks survived.

Writers insert increasing ids into ``t (id int PRIMARY KEY)`` and record each
id whose INSERT (an autocommit transaction) returned: the server acknowledged
that commit, so losing it is data loss. A commit in flight when the server
died may or may not survive; only acknowledged ones are owed.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg


class Ledger:
    """Writers that record every commit the server acknowledged, and reconnect at once
    (through the router) when their connection dies: a connect that is refused, rather
    than held until the job is back, is recorded too."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.acknowledged: list[int] = []
        self.acknowledged_at: dict[int, float] = {}  # id -> when its commit returned (monotonic)
        self.refused: list[str] = []
        self.reconnects = 0
        self.reconnected: list[tuple[float, float]] = []  # (connect began, first commit)
        self.stop = asyncio.Event()
        self._next = 0
        self._grew = asyncio.Condition()

    def first_after(self, moment: float) -> float:
        """When a writer that reconnected after ``moment`` first had a commit acknowledged
        (monotonic): the job was back. Commits of old connections right after the kill
        signal, before the server went down, do not count."""
        return min(t for start, t in self.reconnected if start > moment)

    async def until_acknowledged(self, count: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout), self._grew:
            await self._grew.wait_for(lambda: len(self.acknowledged) >= count
                                      or self.stop.is_set())

    async def write(self, _writer: int) -> None:
        conn: asyncpg.Connection | None = None
        began: float | None = None
        while not self.stop.is_set():
            if conn is None:
                began = time.monotonic() if began is None else began
                try:
                    conn = await asyncpg.connect(self.dsn, timeout=90)
                except (OSError, asyncpg.PostgresError) as exc:
                    self.refused.append(str(exc))
                    await asyncio.sleep(0.05)
                    continue
            self._next += 1
            value = self._next
            try:
                await conn.execute("INSERT INTO t VALUES ($1)", value)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError):  # ("another operation is in progress")
                conn.terminate()
                conn = None
                self.reconnects += 1
                continue
            async with self._grew:
                self.acknowledged.append(value)
                self.acknowledged_at[value] = time.monotonic()
                if began is not None:
                    self.reconnected.append((began, self.acknowledged_at[value]))
                    began = None
                self._grew.notify_all()
        if conn is not None:
            await conn.close()
