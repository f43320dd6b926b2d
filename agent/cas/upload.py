"""Writing a directory as content-addressed objects: only what the store does not hold is sent.

Every file is read in ``CHUNK_SIZE`` pieces (page-aligned: PostgreSQL
relation files change a page at a time, and an append touches only the
last chunks), each named by its keyed hash. A file the hash cache vouches
for is not read at all. A name the store is known to hold (the objects of
the snapshot the directory came from, or of one just uploaded) is not
asked about; any other is looked up, and uploaded only if missing. A
running PostgreSQL may change a file while it is read (base backups): a
file that shrinks is padded with zeros and one that grows is cut at the
size first seen, as pg_basebackup does; WAL replay repairs both.

The caller holds a lease (``leases.py``) from before the first lookup to
after its manifest is written, so the collector deletes nothing it found.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..inventory import gather_bounded
from ..manifest import DirEntry, FileEntry
from ..progress import NoProgress, Progress
from .hashcache import CACHE_NAME, HashCache
from .objects import CHUNK_SIZE, Objects, run_all

PARALLEL = 8  # chunks read, hashed, compressed or uploaded at once


@dataclass
class UploadStats:
    files: int = 0
    bytes: int = 0  # plaintext bytes of every file
    read_bytes: int = 0  # bytes read from disk (files the cache did not vouch for)
    chunks: int = 0
    new_objects: int = 0
    new_bytes: int = 0  # stored (compressed) bytes uploaded
    found: int = 0  # objects looked up and found already stored

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Tree:
    files: list[FileEntry] = field(default_factory=list)
    dirs: list[DirEntry] = field(default_factory=list)


def scan(root: Path, exclude: Callable[[str], bool]) -> tuple[Tree, list[os.stat_result]]:
    """Directories, symlinks and files under ``root`` (files with their lstat), sorted."""
    tree = Tree()
    stats: list[os.stat_result] = []
    for dirpath, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else f"{rel_dir}/"
        if prefix:
            tree.dirs.append(DirEntry(rel_dir, stat.S_IMODE(os.lstat(dirpath).st_mode)))
        for name in list(dirs):
            if os.path.islink(os.path.join(dirpath, name)) or exclude(prefix + name):
                dirs.remove(name)
                if os.path.islink(os.path.join(dirpath, name)):
                    names.append(name)
        dirs.sort()
        for name in sorted(names):
            rel = prefix + name
            if rel == CACHE_NAME or exclude(rel):
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # a running server removed it
            if stat.S_ISLNK(st.st_mode):
                tree.files.append(FileEntry(rel, 0, stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                                            link=os.readlink(os.path.join(dirpath, name))))
            elif stat.S_ISREG(st.st_mode):
                tree.files.append(FileEntry(rel, st.st_size, stat.S_IMODE(st.st_mode),
                                            st.st_mtime_ns))
                stats.append(st)
    return tree, stats


def read_chunk(path: Path, offset: int, length: int, cut: int | None) -> tuple[bytes, int]:
    """``length`` bytes at ``offset`` (zeros past EOF, and past ``cut`` when given), and
    how many of them were read from the file."""
    if cut is not None and offset >= cut:
        return bytes(length), 0
    want = length if cut is None else min(length, cut - offset)
    try:
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), want, offset)
    except FileNotFoundError:
        data = b""
    read = len(data)
    return (data + bytes(length - read) if read < length else data), read


def read_and_name(objects: Objects, path: Path, offset: int, length: int,
                  cut: int | None) -> tuple[bytes, int, str]:
    data, read = read_chunk(path, offset, length, cut)
    return data, read, objects.name(data)


async def upload_files(objects: Objects, root: Path, exclude: Callable[[str], bool], *,
                       cache: HashCache | None = None, known: set[str] | None = None,
                       zero_past: dict[str, int] | None = None,
                       progress: Progress | None = None, lsn_trusted: bool = False,
                       parallel: int = PARALLEL) -> tuple[Tree, UploadStats, HashCache]:
    """Upload what ``root`` holds that the store lacks; returns the tree (for a manifest),
    what it cost, and a hash cache describing the files as read.

    ``zero_past`` maps files to an offset past which they are taken as zeros (a
    stopped cluster's WAL segment past its shutdown checkpoint: bytes of recycled
    segments that a start never reads, and that would never deduplicate).

    ``lsn_trusted``: every change to a relation page moves its LSN (the cluster has
    data checksums or wal_log_hints, so even hint bits are WAL-logged); then only the
    chunks of a changed relation file that hold a page newer than the cache's
    checkpoint are read.
    """
    progress = progress or NoProgress()
    known = set(known or ())
    zero_past = zero_past or {}
    tree, stats = await asyncio.to_thread(scan, root, exclude)
    regular = [f for f in tree.files if f.link is None]
    if progress.total is None:
        progress.total = sum(f.size for f in regular)
    result = UploadStats(files=len(tree.files), bytes=sum(f.size for f in regular))
    new_cache = HashCache(objects.keys.id)
    slots = asyncio.Semaphore(parallel)
    pending: dict[str, asyncio.Future[None]] = {}  # names being looked up or uploaded

    async def ensure(name: str, data: bytes) -> None:
        if name in known:
            return
        if name in pending:
            return await asyncio.shield(pending[name])
        pending[name] = fut = asyncio.get_running_loop().create_future()
        try:
            # file://: the lookup and the store in one job; a remote store: a request each
            stored = await asyncio.to_thread(objects.store_sync, data, name)
            if stored is None:
                if await objects.exists(name):
                    stored = 0
                else:
                    encoded = await asyncio.to_thread(objects.encode, data, name)
                    stored = await objects.put(encoded)
            if stored == 0:
                result.found += 1
            else:
                result.new_bytes += stored  # after the awaits: ``+= await`` loses updates
                result.new_objects += 1
            known.add(name)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: the first caller raises it
            pending.pop(name, None)
            raise

    async def chunk(entry: FileEntry, index: int, names: list[str]) -> None:
        offset = index * CHUNK_SIZE
        length = min(CHUNK_SIZE, entry.size - offset)
        async with slots:
            data, read, names[index] = await asyncio.to_thread(
                read_and_name, objects, root / entry.path, offset, length,
                zero_past.get(entry.path))
            await ensure(names[index], data)
            result.read_bytes += read
            progress.advance(length)

    hits: dict[str, list[str]] = {}
    for entry, st in zip(regular, stats, strict=True):
        cached = cache.lookup(entry.path, entry.size, st.st_mtime_ns) if cache else None
        if cached is not None and entry.path not in zero_past:
            hits[entry.path] = cached
    # A cache hit saves reading the file only if its objects are stored: those of the
    # cache's source snapshot are (the caller passes them as known); others are looked up.
    unsure = sorted({n for names in hits.values() for n in names} - known)
    found = await gather_bounded([objects.exists(n) for n in unsure], parallel * 4)
    known.update(n for n, ok in zip(unsure, found, strict=True) if ok)
    # Relation files that changed: the chunks whose pages all predate the cache's
    # checkpoint are what they were (WAL-G's delta backups rest on the same fact).
    unchanged: dict[str, dict[int, str]] = {}
    if cache is not None and cache.lsn and lsn_trusted:
        candidates = [(f, cache.files[f.path]) for f in regular
                      if f.path not in hits and f.path in cache.files
                      and permanent_relation(root, f.path)]
        found_unchanged = await gather_bounded([
            asyncio.to_thread(unchanged_chunks, root / f.path, f.size, old[0], old[2],
                              cache.lsn) for f, old in candidates], parallel)
        for (f, _old), reuse in zip(candidates, found_unchanged, strict=True):
            # only names the store is known to hold (the cache's source snapshot's)
            unchanged[f.path] = {i: n for i, n in reuse.items() if n in known}
    files: list[FileEntry] = []
    work = []
    for entry in regular:
        names = hits.get(entry.path, [])
        if entry.path in hits and all(n in known for n in names):
            progress.advance(entry.size)
        else:
            names = [""] * -(-entry.size // CHUNK_SIZE)
            same = unchanged.get(entry.path, {})
            for i in range(len(names)):
                if i in same:
                    names[i] = same[i]
                    progress.advance(min(CHUNK_SIZE, entry.size - i * CHUNK_SIZE))
                else:
                    work.append(chunk(entry, i, names))
        files.append(FileEntry(entry.path, entry.size, entry.mode, entry.mtime_ns, names))
    await run_all(work)
    result.chunks = sum(len(f.chunks) for f in files)
    links = [f for f in tree.files if f.link is not None]
    tree.files = sorted(files + links, key=lambda f: f.path)
    new_cache.files = {f.path: (f.size, f.mtime_ns, f.chunks) for f in files
                       if f.path not in zero_past}
    return tree, result, new_cache



_RELATION = re.compile(r"(?:base/\d+|global)/(\d+)(?:\.\d+)?")
_PAGE = 8192


def permanent_relation(root: Path, rel: str) -> bool:
    """A main-fork segment of a logged relation: every change to its pages is in the WAL
    and moves the page's LSN. Unlogged relations (an ``_init`` fork beside them) are
    not, nor are the free space maps (``_fsm``), which are rebuilt rather than logged."""
    m = _RELATION.fullmatch(rel)
    if m is None:
        return False
    return not (root / rel).with_name(f"{m.group(1)}_init").exists()


def unchanged_chunks(path: Path, size: int, old_size: int, old_names: list[str],
                     lsn: int) -> dict[int, str]:
    """Chunk index -> its old name, for the chunks of ``path`` that are as long as they
    were and whose every page has an LSN at or below ``lsn`` (read from the page
    headers only, through mmap)."""
    out: dict[int, str] = {}
    try:
        with open(path, "rb") as f:
            if size == 0:
                return out
            with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                for i, name in enumerate(old_names):
                    start = i * CHUNK_SIZE
                    end = min(start + CHUNK_SIZE, size)
                    if end <= start or end != min(start + CHUNK_SIZE, old_size) \
                            or (end - start) % _PAGE:
                        continue
                    for off in range(start, end, _PAGE):
                        hi, lo = struct.unpack_from("=II", mm, off)
                        if (hi << 32 | lo) > lsn:
                            break
                    else:
                        out[i] = name
    except (OSError, ValueError):
        return {}
    return out


