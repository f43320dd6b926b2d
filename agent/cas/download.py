"""Delta restore: make a directory hold a format 2 snapshot, fetching only what differs.

The directory may already hold most of it: a copy of the template, a stale
warm copy, the remains of the previous instance. Each file is compared
chunk by chunk with what the snapshot lists, by name: the hash cache says
what an unchanged local file holds without reading it, any other local
file is read and hashed, and only the chunks whose names differ are
downloaded (each once, however many files need it), verified against its
name, and written in place. Downloads overlap, and each chunk's
verification, decompression and write are one job on the restore's own
worker threads. Whatever the snapshot does not list is removed. What was
written is on disk before the restore returns (an fsync per file and
directory, or one ``syncfs`` when there are many); files reused as they
were were synced when written.

The result, and the new hash cache, say exactly what the manifest says:
sizes, modes, and each file's mtime as recorded, so that a copy of it is
described by the same cache.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import AgentError
from ..manifest import FileEntry, Manifest
from ..postgres import os_user
from ..progress import NoProgress, Progress
from ..store import get_bytes
from ..store.file import fsync_path
from .hashcache import CACHE_NAME, HashCache, read_cache, write_cache
from .objects import Objects, object_key, run_all

PARALLEL = 16  # objects fetched at once (a store's latency, more than its bandwidth)
SYNCFS_FROM = 200  # files written, from which one syncfs beats an fsync each
SMALL, BATCH = 64 << 10, 32  # files this small are restored this many to a job


@dataclass
class RestoreStats:
    files: int = 0
    reused_files: int = 0  # already as the snapshot has them
    written_files: int = 0
    fetched_objects: int = 0
    written_bytes: int = 0
    hashed_bytes: int = 0  # local bytes read to learn what they hold (no cache entry)
    removed: int = 0  # local entries the snapshot does not have
    names: Counter[str] = field(default_factory=Counter)  # fetched, by name (tests count)


def check_path(rel: str) -> None:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or rel != p.as_posix():
        raise AgentError(f"refusing snapshot entry {rel!r}: not a plain relative path")


def _check_link(entry: FileEntry) -> None:
    target = PurePosixPath(entry.link or "")
    depth = len(PurePosixPath(entry.path).parts) - 1
    ups = 0
    for part in target.parts:
        ups = ups + 1 if part == ".." else ups - 1 if part not in (".", "") else ups
        if ups > depth:
            break
    if target.is_absolute() or ups > depth:
        raise AgentError(f"refusing symlink {entry.path} -> {entry.link}: it leads out of PGDATA")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _prune_local(root: Path, m: Manifest) -> int:
    """Remove local entries the manifest does not list (or lists as another type)."""
    dirs = {d.path for d in m.dirs}
    files = {f.path: f for f in m.files}
    removed = 0
    for dirpath, subdirs, names in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        for name in list(subdirs):
            rel = prefix + name
            if rel not in dirs or os.path.islink(os.path.join(dirpath, name)):
                _remove(Path(dirpath, name))
                subdirs.remove(name)
                removed += 1
        for name in names:
            rel = prefix + name
            f = files.get(rel)
            path = Path(dirpath, name)
            if rel == CACHE_NAME:
                continue
            if f is None or (f.link is None) == path.is_symlink():
                _remove(path)
                removed += 1
    return removed


def _local_names(objects: Objects, path: Path, size: int, chunk_size: int) -> list[str]:
    names = []
    with open(path, "rb", buffering=0) as f:
        for offset in range(0, size, chunk_size):
            names.append(objects.name(os.pread(f.fileno(), chunk_size, offset)))
    return names


def _finish_file(root: Path, f: FileEntry, uid_gid: tuple[int, int] | None,
                 wrote: bool) -> bool:
    """Size, mode, owner and mtime as the manifest says; whether the file needs a sync."""
    path = root / f.path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != f.size:
            os.ftruncate(fd, f.size)
            wrote = True
        os.fchmod(fd, f.mode)
        if uid_gid is not None:
            os.fchown(fd, *uid_gid)
    finally:
        os.close(fd)
    os.utime(path, ns=(f.mtime_ns, f.mtime_ns), follow_symlinks=False)
    return wrote


def syncfs(root: Path) -> bool:
    """Flush the file system holding ``root`` (Linux ``syncfs``): one call instead of an
    fsync per file; False where it cannot be had."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(root, os.O_RDONLY)
    except (OSError, AttributeError):
        return False
    try:
        return bool(hasattr(libc, "syncfs") and libc.syncfs(fd) == 0)
    finally:
        os.close(fd)


def _owner() -> tuple[int, int] | None:
    if os_user() is None:
        return None
    import pwd

    entry = pwd.getpwnam(os_user() or "")
    return entry.pw_uid, entry.pw_gid


async def restore_files(objects: Objects, root: Path, m: Manifest, *,
                        progress: Progress | None = None,
                        parallel: int = PARALLEL) -> RestoreStats:
    """Make ``root`` (existing or not, empty or not) hold exactly ``m``'s files."""
    progress = progress or NoProgress()
    stats = RestoreStats(files=len(m.files))
    for path in [*(d.path for d in m.dirs), *(f.path for f in m.files)]:
        check_path(path)
    for f in m.files:
        if f.link is not None:
            _check_link(f)
    await asyncio.to_thread(root.mkdir, mode=0o700, parents=True, exist_ok=True)
    cache = await asyncio.to_thread(read_cache, root, m.key_id) or HashCache(m.key_id)
    stats.removed = await asyncio.to_thread(_prune_local, root, m)
    owner = await asyncio.to_thread(_owner)

    def make_dirs() -> None:
        for d in sorted(m.dirs, key=lambda d: d.path):
            path = root / d.path
            path.mkdir(mode=d.mode, exist_ok=True)
            path.chmod(d.mode)
            if owner is not None:
                os.chown(path, *owner)
        root.chmod(0o700)
        if owner is not None:
            os.chown(root, *owner)

    await asyncio.to_thread(make_dirs)
    slots = asyncio.Semaphore(parallel)

    regular = [f for f in m.files if f.link is None]
    lstats = await asyncio.to_thread(_lstat_all, root, regular)

    async def local_names(f: FileEntry, st: os.stat_result | None) -> list[str]:
        if st is None:
            return []
        cached = cache.lookup(f.path, st.st_size, st.st_mtime_ns)
        if cached is not None:
            return cached
        async with slots:
            stats.hashed_bytes += st.st_size
            return await asyncio.to_thread(_local_names, objects, root / f.path, st.st_size,
                                           m.chunk_size)

    local = await asyncio.gather(*(local_names(f, st)
                                   for f, st in zip(regular, lstats, strict=True)))
    # chunk jobs: (file, index) whose local chunk differs
    needed = {f.path: [i for i, name in enumerate(f.chunks)
                       if i >= len(have) or have[i] != name]
              for f, have in zip(regular, local, strict=True)}
    if progress.total is None:
        progress.total = sum(min(m.chunk_size, f.size - i * m.chunk_size)
                             for f in regular for i in needed[f.path])
    uses = Counter(f.chunks[i] for f in regular for i in needed[f.path])
    synced: dict[str, bool] = {}  # path -> written (needs a sync)
    fetched: dict[str, asyncio.Future[bytes]] = {}
    loop = asyncio.get_running_loop()
    # Its own threads: a chunk's read, verification, decompression and write are one job
    # (one hop), and the default pool's few threads stay free for everything else.
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="restore")
    read_local = getattr(objects.store, "read_sync", None)  # file:// reads in the worker

    async def fetch(name: str) -> bytes:
        """A name several files need: fetched once, kept until the last of them has it."""
        if name not in fetched:
            fetched[name] = asyncio.ensure_future(objects.get(name))
            stats.fetched_objects += 1
            stats.names[name] += 1
        try:
            return await asyncio.shield(fetched[name])
        finally:
            uses[name] -= 1
            if uses[name] == 0:
                fetched.pop(name, None)

    def fetch_and_write(name: str, blob: bytes | None, path: Path, offset: int) -> int:
        if blob is None:
            assert read_local is not None
            blob = read_local(object_key(name))
        data = objects.decode(name, blob)
        _pwrite(path, data, offset)
        return len(data)

    async def write_chunk(f: FileEntry, index: int) -> None:
        name, path, offset = f.chunks[index], root / f.path, index * m.chunk_size
        async with slots:
            if uses[name] > 1:
                data = await fetch(name)
                await loop.run_in_executor(pool, _pwrite, path, data, offset)
                n = len(data)
            else:
                stats.fetched_objects += 1
                stats.names[name] += 1
                blob = None if read_local else await get_bytes(objects.store,
                                                               object_key(name))
                n = await loop.run_in_executor(pool, fetch_and_write, name, blob, path, offset)
        stats.written_bytes += n
        progress.advance(n)

    async def restore_file(f: FileEntry, st: os.stat_result | None) -> None:
        await asyncio.gather(*(write_chunk(f, i) for i in needed[f.path]))
        wrote = bool(needed[f.path]) or st is None
        if wrote:
            stats.written_files += 1
        else:
            stats.reused_files += 1
            if (st is not None and st.st_size == f.size and st.st_mtime_ns == f.mtime_ns
                    and stat.S_IMODE(st.st_mode) == f.mode
                    and (owner is None or st.st_uid == owner[0])):  # the group: any
                return  # exactly as the snapshot has it: nothing to do
        synced[f.path] = await asyncio.to_thread(_finish_file, root, f, owner, wrote)

    def write_whole_files(batch: list[FileEntry]) -> int:
        """Small files the store holds locally, each one object no other file needs:
        read, verified, written and finished in one job (most of a PGDATA's 1,300 files
        are one 8 KiB page; a job, and two thread hops, each would cost more than the
        file)."""
        assert read_local is not None
        written = 0
        for f in batch:
            name = f.chunks[0]
            data = objects.decode(name, read_local(object_key(name)))
            path = root / f.path
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, f.mode)
                if owner is not None:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
            os.utime(path, ns=(f.mtime_ns, f.mtime_ns))
            written += len(data)
        return written

    async def restore_small(batch: list[FileEntry]) -> None:
        async with slots:
            n = await loop.run_in_executor(pool, write_whole_files, batch)
        for f in batch:
            stats.fetched_objects += 1
            stats.names[f.chunks[0]] += 1
            stats.written_files += 1
            synced[f.path] = True
        stats.written_bytes += n
        progress.advance(n)

    small = [f for f, st in zip(regular, lstats, strict=True)
             if read_local is not None and len(f.chunks) == 1 and needed[f.path] == [0]
             and uses[f.chunks[0]] == 1 and f.size <= SMALL]
    in_batches = {f.path for f in small}
    try:
        await run_all([*(restore_file(f, st) for f, st in zip(regular, lstats, strict=True)
                         if f.path not in in_batches),
                       *(restore_small(small[i:i + BATCH])
                         for i in range(0, len(small), BATCH))])
    except BaseException:
        for fut in fetched.values():
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True)

    def finish() -> None:
        for f in m.files:
            if f.link is not None:
                path = root / f.path
                if not path.is_symlink() or os.readlink(path) != f.link:
                    path.unlink(missing_ok=True)
                    os.symlink(f.link, path)
                    if owner is not None:
                        os.chown(path, *owner, follow_symlinks=False)
        write_cache(root, HashCache.of(m))
        written = [root / f.path for f in regular if synced.get(f.path)]
        # Many files: one flush of the file system (each fsync is a journal commit);
        # a few (a wake over a template copy): just those, not other jobs' writes too.
        if len(written) < SYNCFS_FROM or not syncfs(root):
            for path in written:
                fsync_path(path)
            for d in [root, *(root / d.path for d in m.dirs)]:
                fsync_path(d)

    await asyncio.to_thread(finish)
    return stats


def _pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    finally:
        os.close(fd)


def _lstat_all(root: Path, files: list[FileEntry]) -> list[os.stat_result | None]:
    out: list[os.stat_result | None] = []
    for f in files:
        try:
            st = os.lstat(root / f.path)
        except FileNotFoundError:
            st = None
        out.append(st if st is not None and stat.S_ISREG(st.st_mode) else None)
    return out
