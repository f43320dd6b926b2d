"""Recovering a crashed local job on its own disk, and keeping a copy that would not start.

When a job's PostgreSQL dies and its PGDATA is still here, starting it again
on that data lets PostgreSQL's own crash recovery replay its local WAL:
every acknowledged commit survives, and nothing is downloaded. Only a PGDATA
known to be whole qualifies. The ``ready`` marker (``process.py``) is
written, and synced, only after the data it stands for was synced (a
restore syncs its tree before it starts; a template copy syncs its files),
so a restore or a copy killed half-way, which can look like a cluster and
even start with relation files missing, never counts.

A PGDATA that fails to start is not deleted: it is moved under
``failed/<job>-<time>/`` for an operator to look at, and the oldest such
copies are deleted to keep them within a byte budget. A job that crashes
again and again on its own data (``CrashLoop``) is restored from the store
instead, as a lost disk would be.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import deque
from pathlib import Path

from jobmesh.agent.cas.download import syncfs

from .process import JobDir, is_ready

log = logging.getLogger("jobmesh.controller.local")

# Failed PGDATA copies kept for inspection, at most this many bytes in all.
FAILED_COPIES_BYTES = 2 * 2**30
# More in-place recoveries than this within the window: restore from the store instead.
CRASHES_IN_PLACE = 3
CRASH_WINDOW = 600.0


def whole(jd: JobDir) -> bool:
    """Whether the job's PGDATA here may be started as it is: fully set up (its marker,
    written after the data was synced) and still a cluster."""
    return (is_ready(jd) and (jd.pgdata / "PG_VERSION").is_file()
            and (jd.pgdata / "global" / "pg_control").is_file())


def sync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (what ``initdb --sync-only`` does),
    so that a marker written afterwards never stands for data still in the page cache:
    one ``syncfs`` of its file system where Linux has it (a fresh job's 1,000 files: one
    call instead of 1,000 fsyncs, which under four creates at once took 2 to 3 s each),
    else an fsync each."""
    if syncfs(root):
        return
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CrashLoop:
    """Counts in-place recoveries per job; past the limit the store is asked instead."""

    def __init__(self, limit: int = CRASHES_IN_PLACE, window: float = CRASH_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: dict[str, deque[float]] = {}

    def allow(self, job_id: str) -> bool:
        now = time.monotonic()
        times = self._times.setdefault(job_id, deque())
        while times and now - times[0] > self.window:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True

    def forget(self, job_id: str) -> None:
        self._times.pop(job_id, None)


class FailedCopies:
    """PGDATAs that would not start, kept under ``directory`` within ``budget`` bytes."""

    def __init__(self, directory: Path, budget: int = FAILED_COPIES_BYTES) -> None:
        self.dir = directory
        self.budget = budget

    def keep(self, jd: JobDir) -> Path | None:
        """Move the job's PGDATA (and its server log) aside; None if there was none, or if
        it alone is over the budget (then it is deleted)."""
        if not jd.pgdata.exists():
            return None
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.dir / f"{jd.job_id}-{stamp}-{os.getpid()}"
        dest.mkdir(mode=0o700)
        jd.pgdata.rename(dest / "pgdata")
        with contextlib.suppress(OSError):
            shutil.copy2(jd.postgres_log, dest / "postgres.log")
        size = _tree_bytes(dest)
        if size > self.budget:
            shutil.rmtree(dest, ignore_errors=True)
            log.warning("job %s: its PGDATA that would not start (%d bytes) is over the "
                        "%d-byte budget for failed copies: deleted", jd.job_id, size, self.budget)
            return None
        self._trim()
        return dest

    def copies(self) -> list[Path]:
        """Oldest first."""
        try:
            entries = [e for e in self.dir.iterdir() if e.is_dir()]
        except FileNotFoundError:
            return []
        return sorted(entries, key=lambda e: e.stat().st_mtime)

    def _trim(self) -> None:
        """Delete the oldest copies until all fit (the newest fits alone: ``keep``)."""
        copies = [(c, _tree_bytes(c)) for c in self.copies()]
        total = sum(size for _, size in copies)
        for path, size in copies:
            if total <= self.budget:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= size


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
