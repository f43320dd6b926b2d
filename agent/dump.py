"""Logical dumps: ``pg_dump -Fc`` straight into the store, and back through ``pg_restore``.

A dump is for export, import and moving a job to another major version, so
it is only ever streamed: pg_dump's stdout goes chunk by chunk into
``store.put`` and the download goes chunk by chunk into pg_restore's stdin,
with no local file and nothing held in memory. Like a snapshot it counts
only once its manifest (``dumps/<id>.json``) is stored, written last.

Loading verifies as it streams. pg_restore runs as one transaction and we
hold back the final chunk of the archive until the whole object's size and
sha256 matched the manifest: pg_restore cannot finish (it needs those last
bytes) before we know the dump is intact, and on a mismatch it is killed,
so its transaction rolls back and nothing is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .errors import AgentError
from .manifest import (
    Manifest,
    ManifestError,
    ObjectEntry,
    dump_data_key,
    dump_ids_with_manifest,
    dump_manifest_key,
    job_prefix,
    new_id,
    now_iso,
)
from .postgres import PostgresError, bin_dir
from .progress import NoProgress, Progress
from .store import CHUNK, Digest, NotFound, Store, get_bytes, put_bytes

_STDERR_LINES = 50  # what we keep of a client tool's stderr to explain a failure


@dataclass(frozen=True)
class DumpHeader:
    """What the header of a custom-format archive says about where it came from."""

    database: str
    server_version: str
    pg_dump_version: str


def parse_dump_header(data: bytes) -> DumpHeader | None:
    """Read the header of a ``pg_dump -Fc`` archive (format 1.10 and later), or None.

    Mirrors ``ReadHead`` in pg_backup_archiver.c: magic, version bytes, int and
    offset sizes, format, compression, creation time, then the database name
    and the server and pg_dump versions as length-prefixed strings.
    """
    try:
        if data[:5] != b"PGDMP":
            return None
        vmaj, vmin, vrev, int_size = data[5], data[6], data[7], data[8]
        version = (vmaj, vmin, vrev)
        if version < (1, 10, 0) or not 1 <= int_size <= 8:
            return None
        pos = 11  # offset size and format bytes follow the int size

        def read_int() -> int:
            nonlocal pos
            sign, raw = data[pos], data[pos + 1:pos + 1 + int_size]
            if len(raw) != int_size:
                raise IndexError
            pos += 1 + int_size
            value = int.from_bytes(raw, "little")
            return -value if sign else value

        def read_str() -> str:
            nonlocal pos
            n = read_int()
            if n < 0:
                return ""
            raw = data[pos:pos + n]
            if len(raw) != n:
                raise IndexError
            pos += n
            return raw.decode("utf-8", "replace")

        if version >= (1, 15, 0):
            pos += 1  # compression algorithm: one byte
        else:
            read_int()  # compression level
        for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
            read_int()
        return DumpHeader(read_str(), read_str(), read_str())
    except (IndexError, struct.error):
        return None


def _tool_error(tool: str, stderr_lines: list[str], returncode: int | None) -> str:
    """One line out of a client tool's stderr: its first error, without the tool prefix."""
    lines = [ln.strip() for ln in stderr_lines if ln.strip()]
    errors = [ln for ln in lines if ": error:" in ln or ln.startswith(("error:", "FATAL:"))]
    line = (errors or lines or [f"exit status {returncode}"])[0]
    for prefix in (f"{tool}: error: ", f"{tool}: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return f"{tool} failed: {line}"


async def _collect(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    if stream is None:
        return
    while line := await stream.readline():
        if len(into) < _STDERR_LINES:
            into.append(line.decode("utf-8", "replace").rstrip())


def _client_bin(name: str) -> str:
    try:
        return str(bin_dir() / name)
    except PostgresError as exc:
        raise AgentError(str(exc)) from exc


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# --- dump -------------------------------------------------------------------------


async def dump(dsn: str, store: Store, job: str, *,
               progress: Progress | None = None) -> Manifest:
    """Stream ``pg_dump -Fc`` of the database at ``dsn`` into the store; returns the manifest."""
    progress = progress or NoProgress()
    did = new_id()
    data_key = dump_data_key(job, did)
    proc = await asyncio.create_subprocess_exec(
        _client_bin("pg_dump"), "--format=custom", "--no-password", f"--dbname={dsn}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stderr: list[str] = []
    stderr_task = asyncio.create_task(_collect(proc.stderr, stderr))
    head = bytearray()

    async def chunks() -> AsyncIterator[bytes]:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(CHUNK):
            if len(head) < 4096:
                head.extend(chunk[:4096 - len(head)])
            progress.advance(len(chunk))
            yield chunk
        returncode = await proc.wait()
        await stderr_task
        if returncode != 0:
            # Raised inside the stream, so the store drops the upload: no object appears.
            raise AgentError(_tool_error("pg_dump", stderr, returncode))

    try:
        stored = await store.put(data_key, chunks())
    finally:
        await _kill(proc)
        stderr_task.cancel()
    header = parse_dump_header(bytes(head))
    manifest = Manifest(
        kind="dump", id=did, job=job, created_at=now_iso(),
        objects=[ObjectEntry(data_key[len(job_prefix(job)):], stored.size, stored.sha256)],
        pg_version=header.server_version if header else "",
        extra={"format": "custom",
               "database": header.database if header else "",
               "pg_dump_version": header.pg_dump_version if header else ""},
    )
    await put_bytes(store, dump_manifest_key(job, did), manifest.to_json())
    progress.finish(f"dump {did}, {stored.size / 1e6:,.1f} MB stored")
    return manifest


# --- load -------------------------------------------------------------------------


async def find_dump(store: Store, job: str, dump_id: str | None = None) -> Manifest:
    """The manifest of ``dump_id``, or of the newest dump that has one."""
    ids = dump_ids_with_manifest([o.key for o in await store.list(f"{job}/dumps/")], job)
    if dump_id is None:
        if not ids:
            raise AgentError(f"no dumps of job {job!r} in {store.url}")
        dump_id = ids[-1]
    elif dump_id not in ids:
        hint = f" (newest: {ids[-1]})" if ids else ""
        raise AgentError(f"no dump {dump_id!r} of job {job!r} in {store.url}{hint}")
    try:
        return Manifest.from_json(await get_bytes(store, dump_manifest_key(job, dump_id)))
    except ManifestError as exc:
        raise AgentError(f"dump {dump_id}: {exc}") from exc
    except NotFound as exc:
        raise AgentError(f"dump {dump_id} vanished from {store.url} while loading") from exc


async def load(dsn: str, store: Store, job: str, *, dump_id: str | None = None,
               progress: Progress | None = None) -> Manifest:
    """Restore a dump into the (empty) database at ``dsn`` in one transaction.

    The object is verified against its manifest while it streams; a mismatch
    is an AgentError naming the object, and the database is left untouched.
    """
    manifest = await find_dump(store, job, dump_id)
    if manifest.kind != "dump" or not manifest.objects:
        raise AgentError(f"dump {manifest.id}: its manifest lists no dump object")
    entry = manifest.objects[0]
    key = f"{job_prefix(job)}{entry.key}"
    progress = progress or NoProgress()
    progress.total = progress.total or entry.size
    proc = await asyncio.create_subprocess_exec(
        _client_bin("pg_restore"), "--single-transaction", "--exit-on-error", "--no-password",
        f"--dbname={dsn}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    stderr: list[str] = []
    stderr_task = asyncio.create_task(_collect(proc.stderr, stderr))
    try:
        await _feed_verified(proc, store, key, entry, progress)
        returncode = await proc.wait()
        await stderr_task
        if returncode != 0:
            raise AgentError(_tool_error("pg_restore", stderr, returncode))
    finally:
        await _kill(proc)
        stderr_task.cancel()
    progress.finish(f"dump {manifest.id} loaded")
    return manifest


async def _feed_verified(proc: asyncio.subprocess.Process, store: Store, key: str,
                         entry: ObjectEntry, progress: Progress) -> None:
    """Stream the object into pg_restore, releasing its last chunk only once it verified."""
    assert proc.stdin is not None
    digest = Digest()
    held: bytes | None = None
    broken = False  # pg_restore stopped reading: it failed, and will say why
    try:
        async with contextlib.aclosing(store.get(key)) as chunks:
            async for chunk in chunks:
                digest.update(chunk)
                if digest.size > entry.size:
                    break
                if held is not None and not broken:
                    broken = not await _write(proc, held)
                progress.advance(len(chunk))
                held = chunk
    except NotFound as exc:
        raise AgentError(f"dump object {key} is missing from {store.url}") from exc
    if digest.size != entry.size or digest.hexdigest() != entry.sha256:
        await _kill(proc)  # before it sees the end: its transaction rolls back
        got = ("more than" if digest.size > entry.size else f"{digest.size}")
        raise AgentError(f"dump object {key} is corrupt: expected {entry.size} bytes with "
                         f"sha256 {entry.sha256[:12]}..., got {got} bytes"
                         + ("" if digest.size != entry.size
                            else f" with sha256 {digest.hexdigest()[:12]}...")
                         + "; nothing was loaded")
    if held is not None and not broken:
        await _write(proc, held)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.close()
        await proc.stdin.wait_closed()


async def _write(proc: asyncio.subprocess.Process, data: bytes) -> bool:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True
