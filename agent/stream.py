"""Streaming WAL: what the unfinished segment holds reaches the store within a window.

The archive path (``wal.py``) ships a segment only once it is finished, so
without this a lost machine loses everything since the last segment
switch. Here the agent runs ``pg_receivewal`` as its child against the
job's PostgreSQL (a physical replication connection over the same socket
as its other connections), and every ``window`` seconds uploads what
arrived in the current segment since its last upload, as one small delta
(``walpartial.py``). Nothing arrived, nothing is sent: an idle job costs no
requests.

Whole segments still come from the archive path, which is gap-free by
construction (Postgres will not recycle a segment it has not archived),
where a streaming connection without a replication slot may miss WAL
while the agent is down. That is also why no slot is used: the archive
path already guarantees every finished segment, and a slot would make
Postgres keep WAL on the job's disk for as long as the agent is gone.
Once the archiver has stored a segment whole, pg_receivewal's local copy is
deleted; its deltas are the collector's to delete (``controller/storage/gc.py``):
the agent's store credentials may not delete.

``pg_receivewal`` runs with ``--no-loop``: when Postgres restarts (crash
recovery in place) or goes away, it exits, and the agent starts it again
once ``postmaster.pid`` says a server is ready. A restart resumes at the
start of the unfinished segment (or at the server's current segment): the
bytes it re-receives are the ones already shipped, and only what lies
beyond the shipped offset is uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .manifest import wal_key
from .postgres import bin_dir
from .postmaster import read_postmaster
from .store import Store, put_bytes
from .walnames import is_segment, parse_segment
from .walpartial import (
    Delta,
    compress,
    covered,
    delta_key,
    parse_delta_key,
    partial_prefix,
    streamed_since,
)

if TYPE_CHECKING:
    from .metrics import AgentMetrics

log = logging.getLogger("jobmesh.agent.stream")

STATUS_INTERVAL = 10  # s between pg_receivewal's replies (well inside wal_sender_timeout)
RESTART_DELAY = 1.0  # s before pg_receivewal is started again after it exited...
MAX_RESTART_DELAY = 30.0  # ...doubling while it keeps failing at once, up to this
RAN_LONG = 10.0  # s: a pg_receivewal that ran this long was no failure to start
KEEP_LOCAL = 4  # finished segments kept in the stream directory at most (the spool has them)


class WalStreamer:
    """``pg_receivewal`` into ``directory``, and the deltas it received shipped to the store."""

    def __init__(self, store: Store, job: str, directory: Path, pgdata: Path,
                 dsn: Callable[[], str], *, window: float,
                 metrics: AgentMetrics | None = None, generation: int = 0) -> None:
        self.store = store
        self.job = job
        self.generation = generation  # named in every delta (fence.py)
        self.directory = directory
        self.pgdata = pgdata
        self._dsn = dsn
        self.window = window
        self.metrics = metrics
        self.uploaded = 0  # deltas uploaded
        self.rounds = 0  # shipping rounds done (one a window)
        self.streamed_lsn = 0  # WAL position up to which streamed WAL is in the store
        self.proc: asyncio.subprocess.Process | None = None
        self._shipped: dict[str, int] = {}  # segment -> bytes from offset 0 in the store
        self._keys: dict[str, list[str]] = {}  # segment -> its delta objects
        self._whole: set[str] = set()  # segments the archive path has stored whole
        self._seen: dict[str, int] = {}  # file name -> mtime_ns when last shipped
        self._loaded = False
        self._lock = asyncio.Lock()
        self._last_error: str | None = None

    # -- what the archiver tells us ---------------------------------------------------------

    def stored_whole(self, name: str) -> None:
        """The archive path stored ``name``: its deltas and local copy may go."""
        if is_segment(name):
            self._whole.add(name)

    # -- shipping -----------------------------------------------------------------------------

    async def _load(self) -> None:
        """Learn the deltas already stored (an agent restarted mid-segment)."""
        found: dict[str, list[Delta]] = {}
        for o in await self.store.list(partial_prefix(self.job)):
            if (d := parse_delta_key(self.job, o.key)) is not None:
                found.setdefault(d.segment, []).append(d)
        for seg, deltas in found.items():
            self._keys[seg] = [delta_key(self.job, d) for d in deltas]
            self._shipped[seg] = covered(deltas)
            if await self.store.size(wal_key(self.job, seg)) is not None:
                self._whole.add(seg)
        self._loaded = True

    async def ship(self) -> int:
        """One round: upload what is new, drop what is stored whole; returns deltas sent."""
        async with self._lock:
            if not self._loaded:
                await self._load()
            await self._drop_whole()
            sent = 0
            for name in await asyncio.to_thread(self._local_files):
                seg = name.removesuffix(".partial")
                path = self.directory / name
                if seg in self._whole:
                    if name == seg:
                        path.unlink(missing_ok=True)
                    continue
                sent += await self._ship_file(seg, path)
            await asyncio.to_thread(self._trim_local)
            self.rounds += 1
            return sent

    def _local_files(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_segment(n.removesuffix(".partial")))

    async def _ship_file(self, seg: str, path: Path) -> int:
        try:
            mtime = (await asyncio.to_thread(path.stat)).st_mtime_ns
        except FileNotFoundError:
            return 0  # renamed (finished) since we listed it: next round
        if self._seen.get(path.name) == mtime:
            return 0  # untouched since the last look: an idle job reads and sends nothing
        start = self._shipped.get(seg, 0)
        try:
            data = await asyncio.to_thread(streamed_since, path, start)
        except FileNotFoundError:
            return 0  # finished (renamed) while we looked: next round
        end = start + len(data)
        if end > start:
            blob = await asyncio.to_thread(compress, data)
            key = delta_key(self.job, Delta(seg, start, end, self.generation))
            await put_bytes(self.store, key, blob)
            self._keys.setdefault(seg, []).append(key)
            self._shipped[seg] = end
            self.uploaded += 1
            self.streamed_lsn = max(self.streamed_lsn, parse_segment(seg).start_lsn + end)
            if self.metrics is not None:
                self.metrics.wal_deltas.inc()
                self.metrics.wal_delta_bytes.inc(len(blob))
                self.metrics.wal_streamed_lsn.set(self.streamed_lsn)
        self._seen[path.name] = mtime
        if path.name == seg:
            await asyncio.to_thread(path.unlink, True)  # finished and shipped
            self._seen.pop(path.name, None)
        return 1 if end > start else 0

    async def _drop_whole(self) -> None:
        """Forget the deltas of segments archived whole (the collector deletes them:
        the agent never deletes from the store)."""
        done = [seg for seg in self._keys if seg in self._whole]
        for seg in done:
            del self._keys[seg]
            self._shipped.pop(seg, None)

    def _trim_local(self) -> None:
        """Finished segments the store refused so far stay in the spool anyway."""
        finished = [n for n in self._local_files() if not n.endswith(".partial")]
        for name in finished[:-KEEP_LOCAL]:
            (self.directory / name).unlink(missing_ok=True)

    async def forget(self) -> None:
        """Forget every delta we shipped (after a pause snapshot, which holds the
        unfinished segment in its pg_wal): a resumed job, a newer generation, streams
        that segment afresh. The deltas stay in the store until the collector deletes
        them; a restore tells them from what was streamed after the resume by their
        generation (``restore.wal_after_pause``)."""
        async with self._lock:
            self._keys.clear()
            self._shipped.clear()
            self._seen.clear()
            await asyncio.to_thread(_empty, self.directory)

    # -- pg_receivewal --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep pg_receivewal running beside a ready Postgres and ship every window,
        until ``stop`` is set; then ship once more."""
        ticker = asyncio.create_task(self._tick(stop), name="wal-stream-ship")
        delay = RESTART_DELAY
        at_once = True  # one restart without waiting after pg_receivewal lost its place
        try:
            while not stop.is_set():
                pm = read_postmaster(self.pgdata)
                if pm is not None and pm.status == "ready":
                    began = time.monotonic()
                    lost_place = await self._receive(pm.pid, stop)
                    ran_long = time.monotonic() - began >= RAN_LONG
                    at_once = at_once or ran_long
                    if lost_place and at_once:
                        # Routine at an agent's start: the first base backup's checkpoint
                        # recycled the segment it was to begin with. The next one begins
                        # at the server's current segment, so waiting would only widen
                        # the window WAL is not streamed in.
                        at_once = False
                        continue
                    delay = RESTART_DELAY if ran_long else min(delay * 2, MAX_RESTART_DELAY)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self._end_receiver()
            with contextlib.suppress(Exception):
                await self.ship()

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.window)
            try:
                await self.ship()
            except Exception as exc:  # the store is down: the next round tries again
                log.warning("WAL delta upload failed, will retry: %s", exc)
                if self.metrics is not None:
                    self.metrics.failures.labels("wal_stream").inc()

    async def _receive(self, postmaster: int, stop: asyncio.Event) -> bool:
        """One pg_receivewal, until it exits, the postmaster changes, or ``stop``. True:
        it asked for WAL the server had removed (its directory is emptied)."""
        try:
            dsn = self._dsn()
        except Exception:
            return False
        await asyncio.to_thread(self.directory.mkdir, mode=0o700, parents=True, exist_ok=True)
        self.proc = proc = await asyncio.create_subprocess_exec(
            str(bin_dir() / "pg_receivewal"), "-D", str(self.directory), "-d", dsn,
            "--no-loop", "--no-sync", "--status-interval", str(STATUS_INTERVAL),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        log.info("streaming WAL with pg_receivewal (pid %d) into %s", proc.pid, self.directory)
        errors: list[str] = []
        reader = asyncio.create_task(_read_lines(proc, errors))
        try:
            while proc.returncode is None and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    # (it exits by itself when its server goes; this looks for a server
                    # restarted under it, which it would not notice)
                    await asyncio.wait_for(proc.wait(), 5.0)
                pm = read_postmaster(self.pgdata)
                if proc.returncode is None and (pm is None or pm.pid != postmaster):
                    break  # a new server (or none): the connection is to a dead one
        finally:
            await self._end_receiver()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if errors and not stop.is_set():
            why = errors[-1]
            if "no pg_hba.conf entry for replication" in why:
                why += (" (WAL is not streamed, only finished segments are archived: allow "
                        "`local replication all trust` in pg_hba.conf)")
            if why != self._last_error:  # said once, not at every retry
                log.warning("pg_receivewal exited (%s): %s", proc.returncode, why)
            self._last_error = why
        else:
            self._last_error = None
        if any("has already been removed" in e for e in errors):
            # It resumed from a position the server no longer has (the agent was down
            # long, or a checkpoint recycled the segment as it started): start over at
            # the server's current segment; the spool has the rest.
            await asyncio.to_thread(_empty, self.directory)
            return True
        return False

    async def _end_receiver(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # pg_receivewal writes what it has, then exits
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def finish(self, timeout: float = 10.0) -> None:
        """After Postgres stopped (a pause): let pg_receivewal take the last WAL (the
        shutdown checkpoint) and exit, then ship it all."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            deadline = time.monotonic() + timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), max(deadline - time.monotonic(), 0.1))
            await self._end_receiver()
        await self.ship()


def _empty(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            (directory / name).unlink(missing_ok=True)


async def _read_lines(proc: asyncio.subprocess.Process, errors: list[str]) -> None:
    assert proc.stderr is not None
    async for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        if line:
            errors.append(line)
            del errors[:-20]
            log.debug("pg_receivewal: %s", line)
