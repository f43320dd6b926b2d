"""The warm cache: a paused job's PGDATA kept on this machine, so resuming it here skips the store.

A resume from the store downloads and unpacks the whole snapshot and fsyncs
the tree, which on a slow disk is most of a wake. A node that keeps its
volumes does not pay that: after a pause, the job's cleanly shut down PGDATA
(exactly what the pause snapshot holds) is moved aside, not deleted, and a
resume moves it back and starts it.

The store stays the truth. An entry is used only while it equals the job's
newest state there: its snapshot is the job's latest and no WAL was archived
after it. Anything newer (a base backup, a pause taken on another machine,
WAL of a run elsewhere that was lost) makes it stale, and it is dropped.

Layout, under the backend's root::

    cache/<job id>/pgdata        the PGDATA, as the pause snapshot's shutdown left it
    cache/<job id>/entry.json    the marker: the snapshot it equals, its size, when cached
    cache/.<step>-<job id>-<hex> on its way in or out; garbage after a crash

An entry appears under its job's name in one rename, only once its PGDATA and
marker are on disk, so one interrupted by a crash is never mistaken for a
valid one; start() removes the rest. Entries are evicted oldest first (an
entry is used once: a resume takes it) to stay within the size bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from jobmesh.agent.cas.download import syncfs
from jobmesh.agent.manifest import Manifest

# The same test restore() makes before it replays WAL over a pause snapshot, so the
# cache and the restore never disagree about what is newer than a snapshot.
from jobmesh.agent.restore import wal_after_pause
from jobmesh.agent.snapshot import read_controldata, tree_size
from jobmesh.agent.store import Store

from ...catalog.models import JOB_ID
from ..job_store import latest_snapshot
from .in_place import fsync_dir
from .process import JobDir

log = logging.getLogger("jobmesh.controller.local")

MARKER = "entry.json"


@dataclass(frozen=True)
class Entry:
    """A cache entry's marker."""

    job: str
    snapshot: str  # the pause snapshot's manifest id
    size: int  # bytes of PGDATA
    cached_at: float  # time.time() when it was cached: the eviction order

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, job: str) -> Entry | None:
        """The marker, if it is one of ``job``'s (anything else makes the entry garbage)."""
        try:
            raw = json.loads(data)
            entry = cls(str(raw["job"]), str(raw["snapshot"]), int(raw["size"]),
                        float(raw["cached_at"]))
        except (ValueError, TypeError, KeyError):
            return None
        return entry if entry.job == job and entry.snapshot and entry.size >= 0 else None


def evictions(entries: Sequence[Entry], incoming: int, bound: int) -> list[Entry] | None:
    """The entries to evict, oldest first, so that ``incoming`` more bytes fit within
    ``bound``; None when ``incoming`` alone does not fit."""
    if incoming > bound:
        return None
    total = sum(e.size for e in entries) + incoming
    out = []
    for e in sorted(entries, key=lambda e: (e.cached_at, e.job)):
        if total <= bound:
            break
        out.append(e)
        total -= e.size
    return out


class WarmCache:
    """Paused jobs' PGDATA under ``directory``, at most ``bound`` bytes (0: no cache)."""

    def __init__(self, directory: Path, bound: int) -> None:
        self.dir = directory
        self.bound = bound
        # Held for the renames that add, claim or evict entries (not for the deletions,
        # nor for store requests): the bound is checked against what is there.
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.bound > 0

    async def start(self) -> None:
        """Remove garbage (entries a crash left half-made, or without a valid marker) and
        evict down to the bound; without a cache, remove the directory of an earlier one."""
        async with self._lock:
            await asyncio.to_thread(self._start)

    async def put(self, jd: JobDir, pause: Manifest) -> bool:
        """Move the job's files in as the entry for ``pause`` (the pause snapshot's stored
        manifest), replacing any older entry of the job. False when it is not kept (no
        cache, too big, or PGDATA is not that snapshot's); then, and after a failure, the
        caller deletes what is left of the job's directory, as without a cache."""
        if not self.enabled:
            return False
        job = jd.job_id
        try:
            size = await asyncio.to_thread(_size_if_snapshotted, jd.pgdata, pause)
            if size is None:
                return False
            if size > self.bound:
                log.info("job %s: its PGDATA (%d bytes) alone exceeds the warm cache's bound "
                         "(%d bytes): not kept", job, size, self.bound)
                return False
            entry = Entry(job, pause.id, size, time.time())
            staging = await asyncio.to_thread(self._stage, jd, entry)
        except Exception as exc:  # the snapshot is stored: a cache failure costs speed only
            log.warning("job %s: cannot keep its PGDATA in the warm cache: %s", job, exc)
            return False
        try:
            async with self._lock:
                doomed = await asyncio.to_thread(self._admit, entry, staging)
        except Exception as exc:
            log.warning("job %s: cannot keep its PGDATA in the warm cache: %s", job, exc)
            await asyncio.to_thread(shutil.rmtree, staging, True)
            return False
        await asyncio.to_thread(_remove_all, doomed)
        log.info("job %s: PGDATA of pause snapshot %s kept in the warm cache (%d bytes)",
                 job, entry.snapshot, size)
        return True

    async def take(self, job_id: str, dest: Path, store: Store, *,
                   stale_to: Path | None = None) -> Entry | None:
        """Move the job's entry to ``dest`` (its PGDATA's place), if there is one and it
        equals the job's newest state in ``store``. A stale entry is moved to ``stale_to``
        if given (most of it is still what the store holds: a delta restore's base), else
        dropped; either way the answer is None."""
        if not self.enabled:
            return None
        entry = await asyncio.to_thread(self._read, job_id)
        if entry is None:
            return None
        if why := await _stale(store, job_id, entry):
            log.info("job %s: the warm cache holds pause snapshot %s, but %s: %s", job_id,
                     entry.snapshot, why, "restoring by delta over it" if stale_to
                     else "dropping it")
            if stale_to is not None:
                async with self._lock:
                    claimed = await asyncio.to_thread(self._claim, job_id, entry)
                if claimed is not None:
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread((claimed / "pgdata").rename, stale_to)
                    await asyncio.to_thread(shutil.rmtree, claimed, True)
                return None
            await self.drop(job_id)
            return None
        async with self._lock:
            claimed = await asyncio.to_thread(self._claim, job_id, entry)
        if claimed is None:
            return None  # evicted meanwhile
        try:
            # No download and no fsync: these files are the cluster as its shutdown
            # checkpoint left them (which fsyncs every file Postgres wrote), and what
            # Postgres never wrote itself (files copied from the template) was synced by
            # put() before the entry was published.
            await asyncio.to_thread((claimed / "pgdata").rename, dest)
        except OSError as exc:
            log.warning("job %s: cannot move its PGDATA out of the warm cache: %s", job_id, exc)
            return None
        finally:
            await asyncio.to_thread(shutil.rmtree, claimed, True)
        return entry

    async def drop(self, job_id: str) -> None:
        """Remove the job's entry, if any."""
        async with self._lock:
            detached = await asyncio.to_thread(self._detach, job_id)
        if detached is not None:
            await asyncio.to_thread(shutil.rmtree, detached, True)

    # --- blocking parts (run in threads) ----------------------------------------------------

    def _entry_dir(self, job_id: str) -> Path:
        return self.dir / job_id

    def _scratch(self, step: str, job_id: str) -> Path:
        return self.dir / f".{step}-{job_id}-{secrets.token_hex(4)}"

    def _read(self, job_id: str) -> Entry | None:
        path = self._entry_dir(job_id)
        try:
            entry = Entry.from_json((path / MARKER).read_bytes(), job_id)
        except OSError:
            return None
        return entry if entry is not None and (path / "pgdata" / "PG_VERSION").is_file() else None

    def _entries(self) -> list[Entry]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for e in self.dir.iterdir():
                if JOB_ID.fullmatch(e.name) and (entry := self._read(e.name)) is not None:
                    found.append(entry)
        return found

    def _start(self) -> None:
        if not self.enabled:
            if self.dir.exists():
                log.info("the warm cache is off: removing %s", self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)
            return
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for e in self.dir.iterdir():
            if not JOB_ID.fullmatch(e.name) or self._read(e.name) is None:
                log.warning("warm cache: removing %s (no valid entry: left by a crash?)", e)
                _remove(e)
        victims = evictions(self._entries(), 0, self.bound) or []
        for entry in victims:
            log.info("warm cache: evicting job %s to stay within %d bytes", entry.job,
                     self.bound)
        _remove_all([p for e in victims if (p := self._detach(e.job)) is not None])

    def _stage(self, jd: JobDir, entry: Entry) -> Path:
        """The job's directory, moved (one rename) to a scratch name and made an entry:
        PGDATA, the marker, all on disk. Not yet an entry: see _admit."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self._scratch("incoming", jd.job_id)
        jd.path.rename(staging)  # jobs/<id> is gone at once: a retried pause finds it gone
        try:
            for child in staging.iterdir():  # spool (drained), logs, socket dir, agent.json
                if child.name != "pgdata":
                    _remove(child)
            (staging / MARKER).write_bytes(entry.to_json())
            # The shutdown checkpoint fsynced what Postgres wrote since it started, but not
            # what it never wrote: a job created from a template copy (``cp``) and paused
            # within the kernel's writeback delay has files in the page cache only. One
            # syncfs (as Postgres's own recovery_init_sync_method=syncfs) flushes them, the
            # marker and the renames; it costs a few ms when little is dirty, where an
            # fsync per file costs a device flush per file (~300 ms for 1,300 here).
            _sync_file_system(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _admit(self, entry: Entry, staging: Path) -> list[Path]:
        """Publish ``staging`` as the job's entry, evicting older ones to stay within the
        bound; returns what to delete (outside the lock)."""
        others = [e for e in self._entries() if e.job != entry.job]
        victims = evictions(others, entry.size, self.bound) or []
        doomed = [self._detach(e.job) for e in victims]
        for e in victims:
            log.info("warm cache: evicting job %s (cached %.0f s ago) for job %s", e.job,
                     time.time() - e.cached_at, entry.job)
        doomed.append(self._detach(entry.job))  # the job's older entry, if any
        staging.rename(self._entry_dir(entry.job))
        fsync_dir(self.dir)
        return [p for p in doomed if p is not None]

    def _claim(self, job_id: str, entry: Entry) -> Path | None:
        """The entry, renamed out of the cache (no longer an entry), if it is still ``entry``.

        Not fsynced: should a crash undo the rename, the entry reappears, and is checked
        against the store before any use, as always."""
        if self._read(job_id) != entry:
            return None
        return self._detach(job_id)

    def _detach(self, job_id: str) -> Path | None:
        path = self._entry_dir(job_id)
        scratch = self._scratch("gone", job_id)
        try:
            path.rename(scratch)
        except FileNotFoundError:
            return None
        return scratch


async def _stale(store: Store, job_id: str, entry: Entry) -> str | None:
    """Why the entry no longer equals the job's newest state in the store (None: it does)."""
    latest = await latest_snapshot(store, job_id)
    if latest is None:
        return "the store has no snapshot of the job"
    if latest.id != entry.snapshot:
        return f"the job's latest snapshot is {latest.kind} snapshot {latest.id}"
    if await wal_after_pause(store, job_id, latest):
        return "WAL was archived after it"
    return None


def _size_if_snapshotted(pgdata: Path, pause: Manifest) -> int | None:
    """PGDATA's size, if it is still the cluster the pause snapshot holds: shut down
    cleanly at the snapshot's checkpoint (any start since would have moved it)."""
    control = read_controldata(pgdata)
    same = (control.state == "shut down"
            and control.checkpoint_lsn == pause.start_lsn
            and control.timeline == pause.timeline
            and control.system_identifier == pause.system_identifier)
    if not same:
        log.warning("%s is not the PGDATA of pause snapshot %s (state %s, checkpoint %s): not "
                    "kept in the warm cache", pgdata, pause.id, control.state,
                    control.checkpoint_lsn)
        return None
    return tree_size(pgdata)


def _sync_file_system(path: Path) -> None:
    """syncfs(2) on the file system holding ``path`` (sync(2) where there is none)."""
    if not syncfs(path):
        os.sync()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_all(paths: Sequence[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
