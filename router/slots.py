"""Per-job connection slots, for jobs with a ``max_connections`` limit.

One process counts in memory. Several worker processes share the count
through the kernel instead: slot ``k`` of a job is an ``flock`` on the file
``<dir>/<job>.<k>``. A worker holds the lock for the life of a session, and
if a worker dies the kernel drops its locks, so a crash never leaks slots.
"""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from pathlib import Path
from typing import Protocol


class Slots(Protocol):
    def acquire(self, job_id: str, limit: int) -> object | None:
        """A token for a free slot, or None when the job is at its limit."""

    def release(self, token: object) -> None: ...


class LocalSlots:
    def __init__(self) -> None:
        self._used: Counter[str] = Counter()

    def acquire(self, job_id: str, limit: int) -> object | None:
        if self._used[job_id] >= limit:
            return None
        self._used[job_id] += 1
        return job_id

    def release(self, token: object) -> None:
        job_id = str(token)
        self._used[job_id] -= 1
        if self._used[job_id] <= 0:
            del self._used[job_id]


class SharedSlots:
    def __init__(self, directory: str | Path) -> None:
        self._dir = Path(directory)
        # Not parents=True: the control directory is the supervisor's to create.
        self._dir.mkdir(exist_ok=True)
        self._fds: dict[tuple[str, int], int] = {}
        self._held: set[tuple[str, int]] = set()

    def acquire(self, job_id: str, limit: int) -> object | None:
        for k in range(limit):
            key = (job_id, k)
            if key in self._held:  # flock would let this process lock it twice
                continue
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(self._dir / f"{job_id}.{k}", os.O_CREAT | os.O_RDWR, 0o600)
                self._fds[key] = fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            self._held.add(key)
            return key
        return None

    def release(self, token: object) -> None:
        assert isinstance(token, tuple)
        self._held.discard(token)
        fcntl.flock(self._fds[token], fcntl.LOCK_UN)
