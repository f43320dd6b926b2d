"""Shipping WAL: spool -> store, and store -> ``restore_command``.

Postgres archives each finished segment into the spool with
``basic_archive`` (fsync, then an atomic rename), so a file in the spool
under a WAL name is always whole. The ``Archiver`` compresses and uploads
those files and deletes each one only once the store has confirmed it:
the spool is the only copy until then. What is not in the spool yet (the
unfinished segment) reaches the store through the streamer (``stream.py``)
every WAL window; without it, ``archive_timeout`` bounds it.

Pushing is idempotent the way pgBackRest's is: a segment that is already
stored with identical content is a success (an upload whose deletion was
interrupted gets retried), while different content under the same name
is an error, since it means two servers are archiving into one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shlex
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import zstandard

from .errors import AgentError
from .manifest import history_key, wal_key
from .store import CHUNK, NotFound, Store, StoreError
from .walnames import SEGMENT_SIZE, is_archivable, is_history, is_segment
from .walpartial import fetch_from_deltas

if TYPE_CHECKING:
    from .metrics import AgentMetrics

log = logging.getLogger("jobmesh.agent.wal")

ZSTD_LEVEL = 3
LAG_EVERY = 5.0  # s between looks at archive_lag while an upload hangs (each drain looks too)


def key_for(job: str, name: str) -> str:
    """Where an archived file lives in the store; refuses names Postgres never archives."""
    if is_history(name):
        return history_key(job, name)
    if is_archivable(name):
        return wal_key(job, name)
    raise AgentError(f"{name!r} is not a WAL file name")


# --- push -------------------------------------------------------------------------------


async def _compressed(f: BinaryIO, size: int) -> AsyncIterator[bytes]:
    """An open file as zstd frames (with a content checksum), read and compressed in chunks."""
    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj(size=size)
    while raw := await asyncio.to_thread(f.read, 4 * CHUNK):
        if out := await asyncio.to_thread(comp.compress, raw):
            yield out
    yield comp.flush()


async def _stored_digest(store: Store, key: str) -> tuple[str, int]:
    """sha256 and size of a stored object's decompressed content."""
    dctx = zstandard.ZstdDecompressor().decompressobj()
    h = hashlib.sha256()
    size = 0
    try:
        async for chunk in store.get(key):
            raw = await asyncio.to_thread(dctx.decompress, chunk)
            h.update(raw)
            size += len(raw)
    except zstandard.ZstdError as exc:
        raise AgentError(f"{key} in the store is not valid zstd: {exc}") from exc
    if not dctx.eof:
        raise AgentError(f"{key} in the store is truncated")
    return h.hexdigest(), size


def _file_digest(f: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(4 * CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


async def push_segment(store: Store, job: str, path: Path, *,
                       metrics: AgentMetrics | None = None) -> str:
    """Upload one archived file; returns ``"uploaded"`` or ``"exists"`` (same bytes stored).

    Raises AgentError when the store holds different bytes under that name, and
    FileNotFoundError (untouched) when ``path`` is gone before we could open it.
    """
    name = path.name
    key = key_for(job, name)
    started = time.monotonic()
    # Opened once, first: an archiver that deletes the file after its own upload
    # cannot pull it from under us half-way.
    with await asyncio.to_thread(path.open, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if is_segment(name) and size != SEGMENT_SIZE:
            raise AgentError(f"{path} is {size} bytes, not a whole {SEGMENT_SIZE}-byte segment")
        if await store.size(key) is not None:
            (theirs, their_size), (ours, our_size) = await asyncio.gather(
                _stored_digest(store, key), asyncio.to_thread(_file_digest, f))
            if (theirs, their_size) != (ours, our_size):
                raise AgentError(
                    f"{name} is already archived for job {job} with different content "
                    f"({their_size} bytes, sha256 {theirs[:12]}; ours {our_size} bytes, "
                    f"sha256 {ours[:12]}): is another server archiving into this job?")
            return "exists"
        stored = await store.put(key, _compressed(f, size))
    if metrics is not None:
        metrics.wal_segments.inc()
        metrics.wal_bytes.inc(stored.size)
        metrics.wal_push_seconds.observe(time.monotonic() - started)
    return "uploaded"


# --- fetch ------------------------------------------------------------------------------


async def fetch_segment(store: Store, job: str, name: str, dest: Path) -> None:
    """Download and decompress one archived file to ``dest``, atomically.

    A segment that is not stored whole is rebuilt from its streamed deltas
    (``walpartial.py``), if any start at offset 0.

    Raises NotFound when the store does not have it: Postgres asks for files
    that do not exist (the next segment, newer timelines) as a normal part
    of recovery, so that is an expected answer, not a failure.
    """
    key = key_for(job, name)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    dctx = zstandard.ZstdDecompressor().decompressobj()
    size = 0
    try:
        with tmp.open("wb") as f:
            try:
                async for chunk in store.get(key):
                    raw = await asyncio.to_thread(dctx.decompress, chunk)
                    size += len(raw)
                    await asyncio.to_thread(f.write, raw)
            except NotFound:
                if not is_segment(name) or size:
                    raise
                # The newest segment of a lost server: rebuilt from what was streamed.
                streamed = await fetch_from_deltas(store, job, name, f)
                log.info("%s rebuilt from streamed deltas (%d bytes of WAL)", name, streamed)
            else:
                if not dctx.eof:
                    raise AgentError(f"{key} in the store is truncated")
                if is_segment(name) and size != SEGMENT_SIZE:
                    raise AgentError(f"{key} holds {size} bytes, not a whole segment")
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
        os.replace(tmp, dest)
    except zstandard.ZstdError as exc:
        raise AgentError(f"{key} in the store is corrupt: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


# --- the archiver -----------------------------------------------------------------------


class Archiver:
    """Uploads what Postgres archives into ``spool``, oldest first, ``parallel`` at a time.

    ``run`` keeps doing so until stopped; ``drain`` uploads everything in the
    spool right now (call it after Postgres has stopped to ship the last
    segments). Both may run at once: a file is only ever uploaded by one of
    them, and ``drain`` waits for uploads that ``run`` had started.
    """

    def __init__(self, store: Store, job: str, spool: Path, *,
                 metrics: AgentMetrics | None = None, parallel: int = 4) -> None:
        self.store = store
        self.job = job
        self.spool = spool
        self.metrics = metrics
        self.uploaded = 0  # files uploaded or found already stored by this archiver
        self._slots = asyncio.Semaphore(max(parallel, 1))
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Condition()
        # Called with each file's name once the store holds it (the streamer drops the
        # deltas of a segment that is stored whole).
        self.on_stored: list[Callable[[str], None]] = []

    def pending(self) -> list[Path]:
        """Archived files waiting in the spool, oldest first (WAL names sort in time order)."""
        try:
            names = [e.name for e in os.scandir(self.spool) if is_archivable(e.name)]
        except FileNotFoundError:
            return []
        return [self.spool / n for n in sorted(names)]

    def lag(self) -> float:
        """Age in seconds of the oldest file waiting in the spool (0 when empty)."""
        oldest = None
        for path in self.pending():
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            oldest = mtime if oldest is None else min(oldest, mtime)
        return 0.0 if oldest is None else max(time.time() - oldest, 0.0)

    async def drain(self) -> int:
        """Upload every file now in the spool; returns how many. Raises the first failure
        (after the other uploads have finished) and leaves failed files in the spool."""
        tasks = []
        for path in await asyncio.to_thread(self.pending):
            task = self._inflight.get(path.name)
            if task is None:
                task = asyncio.create_task(self._push(path), name=f"wal-push {path.name}")
                self._inflight[path.name] = task
                task.add_done_callback(partial(self._forget, path.name))
            tasks.append(task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        self._update_lag()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return len(tasks)

    def _forget(self, name: str, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(name, None)

    async def _push(self, path: Path) -> None:
        async with self._slots:
            if not await asyncio.to_thread(path.exists):
                return  # already uploaded and removed by an earlier round
            try:
                await push_segment(self.store, self.job, path, metrics=self.metrics)
            except (AgentError, StoreError, OSError) as exc:
                if isinstance(exc, FileNotFoundError):
                    return
                if self.metrics is not None:
                    self.metrics.failures.labels("wal_push").inc()
                raise
            # The store has it now; only then may the spool's copy go.
            await asyncio.to_thread(path.unlink, True)
            self.uploaded += 1
            for callback in self.on_stored:
                callback(path.name)
        async with self._changed:
            self._changed.notify_all()

    async def wait_uploaded(self, count: int) -> None:
        """Wait until this archiver has shipped at least ``count`` files (for callers and
        tests that need a condition, not a delay)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.uploaded >= count)

    def _update_lag(self) -> None:
        if self.metrics is not None:
            self.metrics.archive_lag.set(self.lag())

    async def run(self, stop: asyncio.Event, interval: float = 0.2) -> None:
        """Ship segments as they appear until ``stop`` is set; failures are logged and
        retried with backoff, never fatal (the spool keeps the files meanwhile).

        archive_lag is refreshed every ``interval`` even while an upload hangs, so
        a store that stopped answering shows up as a growing lag.
        """
        # Every drain refreshes the lag; the watcher is for an upload that hangs, which a
        # few seconds late still shows.
        watcher = asyncio.create_task(self._watch_lag(stop, max(interval, LAG_EVERY)),
                                      name="archive-lag")
        backoff = interval
        try:
            while not stop.is_set():
                try:
                    await self.drain()
                    backoff = interval
                except Exception as exc:  # the store is down, or a conflict: keep the files
                    log.warning("WAL upload failed, will retry: %s", exc)
                    backoff = min(backoff * 2, 30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._update_lag()

    async def _watch_lag(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self._update_lag)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


# --- restore_command ----------------------------------------------------------------------


def restore_command(store_url: str, job: str, *, s3_endpoint: str | None = None) -> str:
    """A ``restore_command`` value that runs ``agent wal-fetch`` as the Postgres OS user.

    When we are root, Postgres runs as ``postgres``, who may not reach our
    interpreter (a pyenv or venv under /root). Then the same Python version
    from the system runs our packages instead; if there is none, say so now
    rather than let recovery fail segment by segment. ``%`` in our own
    arguments is doubled, since Postgres substitutes ``%f`` and ``%p``.
    """
    args = [*postgres_python(), "-m", "jobmesh", "agent", "wal-fetch",
            "--store", store_url, "--job", job]
    if s3_endpoint:
        args += ["--s3-endpoint", s3_endpoint]
    return shlex.join(args).replace("%", "%%") + " %f %p"


def postgres_python() -> list[str]:
    """argv prefix that runs our Python, with our packages, as the Postgres OS user."""
    from .postgres import os_user, run_pg

    if os_user() is None:
        return [sys.executable]
    def runs(cmd: list[str]) -> bool:
        try:
            return run_pg([*cmd, "-c", "import jobmesh.agent.wal"], check=False).returncode == 0
        except OSError:  # the interpreter itself is out of reach
            return False

    if runs([sys.executable]):
        return [sys.executable]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    ours = Path(__file__).resolve().parent.parent
    paths = [str(ours), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    env = "PYTHONPATH=" + os.pathsep.join(dict.fromkeys(paths))
    for candidate in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if Path(candidate).exists():
            cmd = ["env", env, candidate]
            if runs(cmd):
                return cmd
    raise AgentError(f"the Postgres OS user cannot run {sys.executable} and there is no "
                     f"system python{version} to run the agent with; install one or make "
                     f"the interpreter readable by {os_user()}")
