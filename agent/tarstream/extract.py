"""Extraction: a tar.zst download unpacked into a directory by two worker threads.

Nothing is trusted: members leading outside the target are refused, and
the whole stream is read to its end, so zstd checks its frame checksum and
the caller's sha256 sees every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import shutil
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import IO, cast

import zstandard

from ..errors import AgentError
from ..postgres import give_to_postgres
from .pipe import CHUNK, COPY_BUFSIZE, DONE, QUEUE_DEPTH, Stopped

PLAIN_CHUNK = 4 << 20  # decompressed bytes handed from the decompressor to the unpacker
PLAIN_DEPTH = 4
ZEROCOPY_READ = 64 << 10  # reads this large get a view into the chunk, not a copy


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
                if feed.get(timeout=0.2) is DONE:
                    break

    def hand_on(item: object) -> None:
        while not untar_failed.is_set() and not abandon.is_set():
            try:
                plain.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise Stopped

    def decompress() -> None:
        src = _QueueReader(feed)
        try:
            dctx = zstandard.ZstdDecompressor()
            # zstandard's stubs ask for IO[bytes]; it only ever calls read()
            with dctx.stream_reader(cast("IO[bytes]", src), read_size=CHUNK,
                                    read_across_frames=True) as zr:
                # Read to the end: zstd checks the frame checksum there, and the
                # whole download must pass through for the caller's sha256.
                while data := zr.read(PLAIN_CHUNK):
                    hand_on(data)
            hand_on(DONE)
        except Stopped:
            drain_feed(src)
        except BaseException as exc:  # handed to the unpacker, who reports it
            with contextlib.suppress(Stopped):
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
        await asyncio.to_thread(feed.put, DONE)
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
            feed.put_nowait(DONE)
        with contextlib.suppress(queue.Full):
            plain.put_nowait(DONE)
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


def _untar(fileobj: _QueueReader, dest: Path) -> int:
    written = 0
    # A plain (not "r|") TarFile over a forward-only reader: file contents go from
    # the decompressed chunks to the files without tarfile's stream buffering copies.
    with tarfile.TarFile(fileobj=fileobj, mode="r",
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
            # File contents: a view into the chunk, not a copy (tarfile only writes it out).
            return part
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
                item = DONE
            if item is DONE:
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

    # bytearray or memoryview, not any buffer as RawIOBase allows: what tarfile passes
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
