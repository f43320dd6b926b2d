"""The pause snapshot: a cleanly stopped PGDATA, streamed to the store as tar.zst.

A clean shutdown leaves a data directory that starts without any WAL from
elsewhere, so the snapshot is just the directory. It counts only once its
manifest is stored, and the manifest is written last: an agent killed
mid-upload leaves no snapshot (and, for file:// and S3 alike, no object),
and the previous snapshot stays the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import AgentError
from .manifest import (
    Manifest,
    ObjectEntry,
    job_prefix,
    new_id,
    now_iso,
    snapshot_data_key,
    snapshot_manifest_key,
)
from .metrics import AgentMetrics
from .postgres import PostgresError, bin_dir, pid_alive, run_pg
from .progress import NoProgress, Progress
from .store import Store, Stored, put_bytes
from .tarstream import TarZstStream, tar_zst_chunks

# Not part of a stopped cluster's state; a stale pid file would only confuse the next start.
_EXCLUDE = frozenset({"postmaster.pid", "postmaster.opts"})


@dataclass(frozen=True)
class ControlData:
    """What a pause snapshot records from ``pg_controldata``."""

    state: str
    system_identifier: str
    timeline: int
    checkpoint_lsn: str
    wal_segment_size: int = 16 << 20


def parse_controldata(text: str) -> ControlData:
    """Parse ``pg_controldata`` output (run with LC_ALL=C)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    try:
        return ControlData(
            state=fields["Database cluster state"],
            system_identifier=fields["Database system identifier"],
            timeline=int(fields["Latest checkpoint's TimeLineID"]),
            checkpoint_lsn=fields["Latest checkpoint location"],
            wal_segment_size=int(fields.get("Bytes per WAL segment", 16 << 20)),
        )
    except (KeyError, ValueError) as exc:
        raise AgentError(f"unexpected pg_controldata output (missing {exc})") from exc


def read_controldata(pgdata: Path) -> ControlData:
    proc = run_pg([str(bin_dir() / "pg_controldata"), "-D", str(pgdata)], check=False,
                  env={"LC_ALL": "C", "LANG": "C"})
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise AgentError(f"pg_controldata cannot read {pgdata}: "
                         f"{lines[-1] if lines else proc.returncode}")
    return parse_controldata(proc.stdout)


def running_pid(pgdata: Path) -> int | None:
    """The pid in postmaster.pid if that process is alive, else None."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        pid = int(first)
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def check_stopped_pgdata(pgdata: Path) -> tuple[ControlData, str]:
    """Refuse anything but a cleanly shut down data directory; returns its control data
    and major version."""
    pgdata = pgdata.absolute()
    if not pgdata.exists():
        raise AgentError(f"PGDATA {pgdata} does not exist")
    if not (pgdata / "PG_VERSION").is_file() or not (pgdata / "global" / "pg_control").is_file():
        raise AgentError(f"{pgdata} is not a PostgreSQL data directory (no PG_VERSION or "
                         "global/pg_control)")
    pid = running_pid(pgdata)
    if pid is not None:
        raise AgentError(f"PostgreSQL is running on {pgdata} (pid {pid}); stop it first "
                         "(pg_ctl stop -m fast) or take a base backup instead")
    try:
        control = read_controldata(pgdata)
    except PostgresError as exc:
        raise AgentError(str(exc)) from exc
    if control.state != "shut down":
        raise AgentError(f"{pgdata} was not shut down cleanly (cluster state: {control.state}); "
                         "start and stop PostgreSQL, or take a base backup instead")
    return control, (pgdata / "PG_VERSION").read_text().strip()


def recycled_wal(pgdata: Path, control: ControlData) -> set[str]:
    """pg_wal files a clean start never reads: segments past the shutdown checkpoint.

    Postgres recycles old segments by renaming them to future names, so a
    stopped cluster's pg_wal holds up to max_wal_size of stale bytes. Starting
    after a clean shutdown reads only the checkpoint record; we keep its
    segment and anything older (unarchived segments among them), and drop the
    future ones, with their archive_status files.
    """
    hi, _, lo = control.checkpoint_lsn.partition("/")
    # the record, and the page after it, whichever segment that lands in
    keep_until = ((int(hi, 16) << 32 | int(lo, 16)) + 2 * 8192) // control.wal_segment_size
    per_xlogid = (1 << 32) // control.wal_segment_size
    out: set[str] = set()
    try:
        names = os.listdir(pgdata / "pg_wal")
    except FileNotFoundError:
        return out
    for name in names:
        if len(name) != 24 or not all(c in "0123456789ABCDEF" for c in name):
            continue
        tli, number = int(name[:8], 16), int(name[8:16], 16) * per_xlogid + int(name[16:], 16)
        if tli == control.timeline and number > keep_until:
            out |= {f"pg_wal/{name}", f"pg_wal/archive_status/{name}.done",
                    f"pg_wal/archive_status/{name}.ready"}
    return out


def tree_size(path: Path, exclude: Callable[[str], bool] = lambda _rel: False) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        rel_root = os.path.relpath(root, path).replace(os.sep, "/")
        for name in files:
            if exclude(name if rel_root == "." else f"{rel_root}/{name}"):
                continue
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


async def upload_tree(store: Store, key: str, directory: Path,
                      exclude: Callable[[str], bool], progress: Progress
                      ) -> tuple[Stored, TarZstStream]:
    """Stream ``directory`` as tar.zst into ``key``, advancing ``progress`` by tar bytes.

    Returns what the store recorded and the finished stream (sizes, file count).
    """
    stream = tar_zst_chunks(directory, exclude=exclude)

    async def counted() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in stream:
            progress.advance(stream.uncompressed_size - seen)
            seen = stream.uncompressed_size
            yield chunk

    try:
        stored = await store.put(key, counted())
    finally:
        await stream.aclose()  # stops the tar worker if the upload failed
    return stored, stream


async def take_snapshot(pgdata: Path, store: Store, job: str, *,
                        progress: Progress | None = None,
                        metrics: AgentMetrics | None = None,
                        generation: int = 0) -> Manifest:
    """Upload a pause snapshot of a cleanly stopped PGDATA; returns its (stored) manifest."""
    progress = progress or NoProgress()
    pgdata = await asyncio.to_thread(pgdata.absolute)  # Postgres tools run from /
    started = time.monotonic()
    try:
        control, pg_version = await asyncio.to_thread(check_stopped_pgdata, pgdata)
        skip = _EXCLUDE | await asyncio.to_thread(recycled_wal, pgdata, control)
        if progress.total is None:
            progress.total = await asyncio.to_thread(tree_size, pgdata, skip.__contains__)
        sid = new_id()
        data_key = snapshot_data_key(job, sid)
        stored, stream = await upload_tree(store, data_key, pgdata, skip.__contains__, progress)
        manifest = Manifest(
            kind="pause", id=sid, job=job, created_at=now_iso(), generation=generation,
            objects=[ObjectEntry(data_key[len(job_prefix(job)):], stored.size, stored.sha256)],
            pg_version=pg_version, system_identifier=control.system_identifier,
            timeline=control.timeline, start_lsn=control.checkpoint_lsn,
            uncompressed_size=stream.uncompressed_size,
            extra={"files": stream.files, "format": "tar", "compression": "zstd",
                   "recycled_wal_skipped": sum(1 for k in skip if k.count("/") == 1
                                               and k.startswith("pg_wal/"))},
        )
        await put_bytes(store, snapshot_manifest_key(job, sid), manifest.to_json())
    except BaseException:
        if metrics is not None:
            metrics.failures.labels(kind="snapshot").inc()
        raise
    if metrics is not None:
        metrics.snapshot_bytes.labels(kind="pause").inc(stored.size)
        metrics.snapshot_seconds.labels(kind="pause").observe(time.monotonic() - started)
    ratio = stream.uncompressed_size / stored.size if stored.size else 0.0
    progress.finish(f"{stored.size / 1e6:,.1f} MB stored (x{ratio:.1f})")
    return manifest
