"""The ``file://`` store: a directory tree, written atomically with fsync and rename."""

from __future__ import annotations

import asyncio
import builtins
import os
import secrets
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from . import CHUNK, Digest, NotFound, ObjectInfo, Stored, StoreError


class FileStore:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def make_private(self, reader_gid: int | None = None) -> None:
        """Make the store's directory ours and no one else's: made if missing, refused
        (StoreError) if another user owns it, else mode 0700. ``reader_gid``: a group
        that may read (the Postgres OS user's, when we run as root: its
        ``restore_command`` reads WAL from the store): mode 2750, setgid so that what we
        add below is the group's too (our files are 0640), and nothing it can write."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.root.stat()
        except OSError as exc:
            raise StoreError(f"cannot make the store {self.root}: {exc.strerror}") from exc
        if st.st_uid != os.geteuid():
            raise StoreError(f"the store {self.root} belongs to uid {st.st_uid}, not to the "
                             f"user jobmesh runs as (uid {os.geteuid()}): chown it, or use "
                             "another store")
        want = 0o700 if reader_gid is None else 0o2750
        try:
            if reader_gid is not None and st.st_gid != reader_gid:
                _regroup(self.root, reader_gid)  # (once: a store made before)
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(self.root, want)
        except OSError as exc:
            raise StoreError(f"cannot make the store {self.root} private: "
                             f"{exc.strerror}") from exc

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid object key {key!r}")
        return self.root / key

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        digest = Digest()
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
            fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                async for chunk in chunks:
                    digest.update(chunk)
                    await asyncio.to_thread(_write_all, fd, chunk)
                await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
            await asyncio.to_thread(os.replace, tmp, path)
            await asyncio.to_thread(fsync_path, path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Stored(key, digest.size, digest.hexdigest())

    async def put_new(self, key: str, data: bytes) -> bool:
        return await asyncio.to_thread(self.put_new_sync, key, data)

    def put_new_sync(self, key: str, data: bytes) -> bool:
        """``put_new`` in the caller's thread: written whole, then linked into place,
        which fails (False) if the name is taken; a rename would replace it."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            _write_durably(tmp, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_path(path.parent)
            return True
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    async def get(self, key: str) -> AsyncGenerator[bytes, None]:
        path = self._path(key)
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"no object {key} in {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    def put_sync(self, key: str, data: bytes, *, sync_dir: bool = True) -> Stored:
        """A whole (small) object written in the caller's thread, as atomically and durably
        as ``put``: a pause's worker names, compresses and stores a chunk in one go.
        ``sync_dir=False`` leaves the rename's durability to a later ``sync_dirs``."""
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            _write_durably(tmp, data)
            os.replace(tmp, path)
            if sync_dir:
                fsync_path(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
        digest = Digest()
        digest.update(data)
        return Stored(key, digest.size, digest.hexdigest())

    def read_sync(self, key: str) -> bytes:
        """A whole (small) object, read in the caller's thread: a restore's worker reads,
        verifies and writes a chunk in one go."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no object {key} in {self.url}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc.strerror}") from exc

    def sync_dirs(self, keys: builtins.list[str]) -> None:
        """Make the renames that stored ``keys`` durable: each directory once."""
        for parent in sorted({self._path(k).parent for k in keys}):
            fsync_path(parent)

    def size_sync(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    async def size(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(self._path(key).stat)).st_size
        except FileNotFoundError:
            return None

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._list, prefix)

    # builtins.list: inside this class ``list`` is the method above
    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        out: builtins.list[ObjectInfo] = []
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.exists():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".partial"):
                    continue  # an upload in progress, or one that died
                p = Path(dirpath, name)
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        out.append(ObjectInfo(key, p.stat().st_size))
                    except FileNotFoundError:
                        continue  # deleted since the walk saw it: as S3, a listing is a moment
        return sorted(out, key=lambda o: o.key)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    async def delete_many(self, keys: builtins.list[str]) -> None:
        for key in keys:
            await self.delete(key)

    async def abort_incomplete(self, older_than: float, *, dry_run: bool = False) -> int:
        """Remove ``.partial`` files (uploads that died: a kill -9 leaves one) older than
        ``older_than`` s."""
        return await asyncio.to_thread(self._abort_incomplete, time.time() - older_than,
                                       dry_run)

    def _abort_incomplete(self, cutoff: float, dry_run: bool) -> int:
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not (name.startswith(".") and name.endswith(".partial")):
                    continue
                path = Path(dirpath, name)
                try:
                    if path.stat().st_mtime < cutoff:
                        if not dry_run:
                            path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    async def close(self) -> None:
        pass


def _write_durably(tmp: Path, data: bytes) -> None:
    """A new file ``tmp`` (its directory made if missing) holding ``data``, fsynced."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _regroup(root: Path, gid: int) -> None:
    """Give a store's tree to ``gid`` (read only: directories 2750, files 0640)."""
    for dirpath, _dirs, files in os.walk(root):
        os.chown(dirpath, -1, gid)
        os.chmod(dirpath, 0o2750)
        for name in files:
            path = os.path.join(dirpath, name)
            os.chown(path, -1, gid, follow_symlinks=False)
            if not os.path.islink(path):
                os.chmod(path, 0o640)
