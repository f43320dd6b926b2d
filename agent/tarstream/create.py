"""Writing: a directory as an async iterator of tar.zst chunks, made by a worker thread.

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
import stat
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, cast

import zstandard

from ..errors import AgentError
from .pipe import CHUNK, COPY_BUFSIZE, DONE, QUEUE_DEPTH, Stopped


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
        if item is DONE:
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
                self._queue.put_nowait(DONE)

    # --- the worker thread ---------------------------------------------------------

    def _emit(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise Stopped

    def _produce(self) -> None:
        try:
            sink = _ChunkSink(self._emit)
            cctx = zstandard.ZstdCompressor(level=self._level, threads=self._threads,
                                            write_checksum=True)
            # zstandard's stubs ask for IO[bytes]; it only ever calls write() and flush()
            with cctx.stream_writer(cast("IO[bytes]", sink), closefd=False,
                                    write_size=CHUNK) as zw:
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
            self._emit(DONE)
        except Stopped:
            pass
        except BaseException as exc:  # handed to the consumer, who re-raises it
            with contextlib.suppress(Stopped):
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
            raise Stopped
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


class _ChunkSink(io.RawIOBase):
    """Collects compressed output and hands it on in CHUNK-sized pieces."""

    def __init__(self, emit: Callable[[object], None]) -> None:
        self._emit = emit
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    # bytes, not any buffer as RawIOBase allows: zstandard writes bytes only
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

    # The rest of a file, as tarfile's type asks; in mode "w" tarfile never calls them.
    def read(self, size: int, /) -> bytes:
        raise io.UnsupportedOperation("write-only")

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("not seekable")

    def close(self) -> None:
        """Nothing to close: the zstd writer is closed by its owner."""


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
