"""Streaming a directory as a zstd-compressed tar, and back.

Snapshots and base backups are PGDATA-sized (gigabytes), so neither side
ever holds an archive in memory or writes a local copy: a worker thread
walks the tree, writes tar through a multithreaded zstd compressor, and
hands ~1 MiB compressed chunks to the event loop through a bounded queue;
extraction runs the same pipe in reverse. The compressor and the
decompressor release the GIL, so the event loop keeps serving uploads.

A running Postgres changes its files while we read them (base backups):
files that vanish are skipped, files that shrink are padded with zeros
and files that grow are cut at the size seen at open. WAL replay from the
backup's start repairs all of those, as it does for ``pg_basebackup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath

import zstandard

from .errors import AgentError
from .postgres import give_to_postgres

CHUNK = 1 << 20  # compressed bytes handed over per queue item
COPY_BUFSIZE = 1 << 20
QUEUE_DEPTH = 4  # bounds memory: at most this many chunks wait for the uploader
PLAIN_CHUNK = 4 << 20  # decompressed bytes handed from the decompressor to the unpacker
PLAIN_DEPTH = 4
ZEROCOPY_READ = 64 << 10  # reads this large get a view into the chunk, not a copy
_DONE = object()


class TarZstStream(AsyncIterator[bytes]):
    """The compressed archive as an async iterator of chunks.

    ``uncompressed_size`` (tar bytes) and ``files`` grow while it is being
    consumed and are final once iteration ends.
    """

    def __init__(self, directory: Path, exclude: Callable[[str], bool] | None,
                 extra: Mapping[str, bytes] | None, threads: int, level: int) -> None:
        self.directory = directory
        self.uncompressed_size = 0
        self.compressed_size = 0
        self.files = 0
        self.skipped: list[str] = []  # files that vanished while we walked
        self._exclude = exclude or (lambda _rel: False)
        self._extra = dict(extra or {})
        self._threads = -1 if threads <= 0 else threads  # zstandard: -1 = all cores
        self._level = level
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False

    def __aiter__(self) -> TarZstStream:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        if self._thread is None:
            if not self.directory.is_dir():
                raise AgentError(f"{self.directory} is not a directory")
            self._thread = threading.Thread(target=self._produce, name="tar-zst", daemon=True)
            self._thread.start()
        try:
            item = await asyncio.to_thread(self._queue.get)
        except BaseException:
            await self.aclose()
            raise
        if item is _DONE:
            self._finished = True
            await asyncio.to_thread(self._thread.join)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        assert isinstance(item, bytes)
        self.compressed_size += len(item)
        return item

    async def aclose(self) -> None:
        """Stop the worker (the consumer gave up, e.g. the upload failed)."""
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    while True:
                        self._queue.get_nowait()  # unblock a worker waiting on a full queue
                await asyncio.to_thread(self._thread.join, 0.05)
            # A cancelled __anext__ leaves its queue.get() blocked in a pool thread (a
            # cancelled await does not stop the thread); wake it, or the loop's shutdown
            # would wait for it forever.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_DONE)

    # --- the worker thread ---------------------------------------------------------

    def _emit(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _produce(self) -> None:
        try:
            sink = _ChunkSink(self._emit)
            cctx = zstandard.ZstdCompressor(level=self._level, threads=self._threads,
                                            write_checksum=True)
            with cctx.stream_writer(sink, closefd=False, write_size=CHUNK) as zw:
                counter = _CountingWriter(zw, self)
                tar = tarfile.TarFile(fileobj=counter, mode="w", format=tarfile.PAX_FORMAT,
                                      copybufsize=COPY_BUFSIZE)
                for name, data in sorted(self._extra.items()):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o600
                    info.mtime = int(time.time())
                    tar.addfile(info, io.BytesIO(data))
                    self.files += 1
                for rel, path in self._walk():
                    self._add(tar, rel, path)
                tar.close()  # end-of-archive blocks; leaves our writer open
            sink.flush()
            self._emit(_DONE)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the consumer, who re-raises it
            with contextlib.suppress(_Stopped):
                self._emit(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))

    def _walk(self) -> Iterator[tuple[str, Path]]:
        """(relative path, path) of every entry, parents first, in a stable order."""
        pending = [("", self.directory)]
        while pending:
            rel_dir, path = pending.pop()
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except FileNotFoundError:
                continue  # a directory removed while we walked
            subdirs = []
            for entry in entries:
                rel = f"{rel_dir}{entry.name}"
                if rel in self._extra or self._exclude(rel):
                    continue
                yield rel, Path(entry.path)
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append((f"{rel}/", Path(entry.path)))
            pending.extend(reversed(subdirs))

    def _add(self, tar: tarfile.TarFile, rel: str, path: Path) -> None:
        if self._stop.is_set():
            raise _Stopped
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.skipped.append(rel)
            return
        if stat.S_ISREG(st.st_mode):
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed below, after the copy
            except FileNotFoundError:
                self.skipped.append(rel)
                return
            with f:
                info = tar.gettarinfo(arcname=rel, fileobj=f)
                tar.addfile(info, _ExactReader(f, info.size))
            self.files += 1
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            try:
                info = tar.gettarinfo(str(path), arcname=rel)
            except FileNotFoundError:
                self.skipped.append(rel)
                return
            tar.addfile(info)
        # sockets and fifos (a running server's .s.PGSQL.*) have no place in a backup


class _Stopped(Exception):
    """The consumer went away; the worker unwinds quietly."""


class _ChunkSink(io.RawIOBase):
    """Collects compressed output and hands it on in CHUNK-sized pieces."""

    def __init__(self, emit: Callable[[object], None]) -> None:
        self._emit = emit
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._buf += data
        while len(self._buf) >= CHUNK:
            piece = bytes(self._buf[:CHUNK])
            del self._buf[:CHUNK]
            self._emit(piece)
        return len(data)

    def flush(self) -> None:
        if self._buf:
            piece = bytes(self._buf)
            self._buf.clear()
            self._emit(piece)


class _CountingWriter:
    """What tarfile writes into: counts the uncompressed bytes on their way to zstd."""

    def __init__(self, target: zstandard.ZstdCompressionWriter, stream: TarZstStream) -> None:
        self._target = target
        self._stream = stream
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._target.write(data)
        self._pos += len(data)
        self._stream.uncompressed_size = self._pos
        return len(data)

    def tell(self) -> int:
        return self._pos


class _ExactReader:
    """Exactly ``size`` bytes of a file: cut if it grew, zero-padded if it shrank."""

    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n) if n else b""
        if len(data) < n:
            data += bytes(n - len(data))
        self._left -= n
        return data


def tar_zst_chunks(directory: Path, *, exclude: Callable[[str], bool] | None = None,
                   extra: Mapping[str, bytes] | None = None, threads: int = 0,
                   level: int = 3) -> TarZstStream:
    """Stream ``directory`` as tar.zst chunks (paths relative to it).

    ``exclude(relpath)`` returning True skips a file, or a directory with
    everything under it; ``extra`` adds in-memory files (e.g. backup_label)
    at the top of the archive, shadowing same-named files on disk.
    ``threads=0`` compresses on all cores. The returned iterator's
    ``uncompressed_size`` is the tar's size once it is exhausted.
    """
    return TarZstStream(directory, exclude, extra, threads, level)


# --- extraction -----------------------------------------------------------------------


async def extract_tar_zst(chunks: AsyncIterator[bytes], dest: Path) -> int:
    """Decompress and unpack a tar.zst stream into ``dest`` (empty or missing).

    Refuses members with absolute paths or ``..``, or links leading out of
    ``dest``. Returns the bytes of file content written. The result is
    handed to the Postgres OS user with mode 0700 on ``dest``, as Postgres
    demands. On failure, whatever was unpacked stays: the caller decides
    whether to wipe it.
    """
    await asyncio.to_thread(prepare_empty_dir, dest)
    # Three stages overlap: the event loop downloads, one thread decompresses and
    # another writes files (zstd and file writes both release the GIL). Both
    # queues are bounded, so memory stays at a few chunks whatever the archive.
    feed: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
    plain: queue.Queue[object] = queue.Queue(PLAIN_DEPTH)
    result: list[object] = []
    abandon = threading.Event()
    untar_failed = threading.Event()

    def drain_feed(src: _QueueReader) -> None:
        while not src.eof and not abandon.is_set():  # the feeder must never block on us
            with contextlib.suppress(queue.Empty):
                if feed.get(timeout=0.2) is _DONE:
                    break

    def hand_on(item: object) -> None:
        while not untar_failed.is_set() and not abandon.is_set():
            try:
                plain.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped

    def decompress() -> None:
        src = _QueueReader(feed)
        try:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(src, read_size=CHUNK, read_across_frames=True) as zr:
                # Read to the end: zstd checks the frame checksum there, and the
                # whole download must pass through for the caller's sha256.
                while data := zr.read(PLAIN_CHUNK):
                    hand_on(data)
            hand_on(_DONE)
        except _Stopped:
            drain_feed(src)
        except BaseException as exc:  # handed to the unpacker, who reports it
            with contextlib.suppress(_Stopped):
                hand_on(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            drain_feed(src)

    def unpack() -> None:
        src = _QueueReader(plain, abandon)
        try:
            written = _untar(src, dest)
            while src.read(PLAIN_CHUNK):  # the rest (tar padding), up to the end
                pass
            result.append(written)
        except BaseException as exc:  # handed to the event loop below
            result.append(exc)
            untar_failed.set()

    workers = [threading.Thread(target=decompress, name="unzstd", daemon=True),
               threading.Thread(target=unpack, name="untar", daemon=True)]
    for worker in workers:
        worker.start()

    def join_all() -> None:
        for worker in workers:
            worker.join()

    try:
        async for chunk in chunks:
            if result:
                break  # the unpacker failed; stop downloading
            await asyncio.to_thread(feed.put, chunk)
        await asyncio.to_thread(feed.put, _DONE)
        await asyncio.to_thread(join_all)
    except BaseException:
        # The download failed or we were cancelled: cut the workers' input short
        # and wait for them, so nobody wipes the directory while they still write.
        abandon.set()
        for q in (feed, plain):
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
        with contextlib.suppress(queue.Full):
            feed.put_nowait(_DONE)
        with contextlib.suppress(queue.Full):
            plain.put_nowait(_DONE)
        join_all()
        raise
    finally:
        abandon.set()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        if isinstance(outcome, tarfile.FilterError | AgentError):
            raise AgentError(f"refusing archive member: {outcome}") from outcome
        if isinstance(outcome, zstandard.ZstdError | tarfile.TarError | EOFError):
            raise AgentError(f"corrupt archive: {outcome}") from outcome
        raise outcome
    await asyncio.to_thread(give_to_postgres, dest)
    await asyncio.to_thread(os.chmod, dest, 0o700)
    assert isinstance(outcome, int)
    return outcome


def _untar(fileobj: object, dest: Path) -> int:
    written = 0
    # A plain (not "r|") TarFile over a forward-only reader: file contents go from
    # the decompressed chunks to the files without tarfile's stream buffering copies.
    with tarfile.TarFile(fileobj=fileobj, mode="r",  # type: ignore[arg-type]
                         copybufsize=COPY_BUFSIZE) as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts:
                raise AgentError(f"{member.name!r} leads outside the target directory")
            tar.extract(member, dest, filter="data", set_attrs=not member.isdir())
            if member.isfile():
                written += member.size
                _start_writeback(os.path.join(dest, member.name))
        for member in tar.getmembers():
            if member.isdir():  # directory modes last, once nothing more goes in
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(dest / member.name, member.mode & 0o7777 | 0o700)
    return written


def _start_writeback(path: str) -> None:
    """Have the kernel start writing a finished file out now, while we unpack the next
    ones (as ``initdb --sync-only`` does before its fsyncs), so the caller's final
    fsync of the tree has little left to wait for. Best effort: the fsync is what counts."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class _QueueReader(io.RawIOBase):
    """A readable file over queued chunks, for the zstd stream reader."""

    def __init__(self, feed: queue.Queue[object], abandon: threading.Event | None = None) -> None:
        self._feed = feed
        self._abandon = abandon  # once set, an empty queue counts as the end
        self._buf = b""
        self._pos = 0
        self._offset = 0  # bytes read so far
        self.eof = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._offset

    def seek(self, pos: int, whence: int = 0) -> int:
        """Forward only (tarfile skipping to the next header); going back is refused."""
        if whence == 1:
            pos += self._offset
        elif whence != 0:
            raise OSError("the archive is a stream: cannot seek from its end")
        if pos < self._offset:
            raise tarfile.ReadError("the archive is a stream: cannot seek backwards")
        while self._offset < pos:
            if not self._next(pos - self._offset):
                break
        return self._offset

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while part := self._next(1 << 62):
                parts.append(bytes(part))
            return b"".join(parts)
        part = self._next(n)
        if len(part) < n:
            parts = [bytes(part)]  # a read across two chunks: glue the pieces
            got = len(part)
            while got < n and (more := self._next(n - got)):
                parts.append(bytes(more))
                got += len(more)
            return b"".join(parts)
        if len(part) >= ZEROCOPY_READ:
            return part  # type: ignore[return-value]  # file contents: no copy
        return bytes(part)

    def _next(self, n: int) -> memoryview:
        """Up to n bytes from the current chunk (fetching one if needed), as a view."""
        while self._pos >= len(self._buf) and not self.eof:
            try:
                item = self._feed.get(timeout=None if self._abandon is None else 0.2)
            except queue.Empty:
                assert self._abandon is not None
                if not self._abandon.is_set():
                    continue
                item = _DONE
            if item is _DONE:
                self.eof = True
            elif isinstance(item, BaseException):
                self.eof = True
                raise item
            else:
                assert isinstance(item, bytes)
                self._buf, self._pos = item, 0
        start = self._pos
        end = min(len(self._buf), start + n)
        self._pos = end
        self._offset += end - start
        return memoryview(self._buf)[start:end]

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def prepare_empty_dir(dest: Path) -> None:
    """Make sure ``dest`` is an empty directory (creating it), or refuse."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AgentError(f"{dest} is not empty: refusing to restore over existing files")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)


def wipe(directory: Path) -> None:
    """Empty a directory we unpacked into, keeping the directory itself."""
    if not directory.exists():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
