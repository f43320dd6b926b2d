"""The pause snapshot: a cleanly stopped PGDATA, as the objects the store does not hold yet.

A clean shutdown leaves a data directory that starts without any WAL from
elsewhere, so the snapshot is just the directory: its files as
content-addressed objects (``cas``), of which a pause uploads only the new
ones (the hash cache beside the files says which changed without reading
the others). It counts only once its manifest is stored, and the manifest
is written last: an agent killed mid-upload leaves no snapshot, only
unreferenced objects for the collector, and the previous snapshot stays the
latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cas import CHUNK_SIZE, Keyring, Tree, UploadStats, write_cache, write_snapshot
from .cas.keys import KeySet
from .errors import AgentError
from .manifest import Manifest, new_id, now_iso
from .metrics import AgentMetrics
from .postgres import PostgresError, bin_dir, pid_alive, run_pg
from .progress import NoProgress, Progress
from .store import Store
from .walnames import format_lsn, parse_lsn

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
    # every page change moves its LSN (hint bits too): data checksums or wal_log_hints
    page_lsns_tell_changes: bool = False


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
            page_lsns_tell_changes=fields.get("Data page checksum version", "0") != "0"
            or fields.get("wal_log_hints setting") == "on",
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


def wal_cuts(control: ControlData, page: int = 8192) -> dict[str, int]:
    """Where the shutdown checkpoint's WAL ends, per segment file: past it a clean start
    reads nothing (it zeroes the rest of its last page itself), and the bytes there are
    a recycled segment's, which would make every pause's copy of the segment unique."""
    hi, _, lo = control.checkpoint_lsn.partition("/")
    end = (int(hi, 16) << 32 | int(lo, 16)) + 2 * page
    end += -end % page
    size = control.wal_segment_size
    per_xlogid = (1 << 32) // size
    out = {}
    for number in {(end - 2 * page) // size, end // size}:
        name = f"{control.timeline:08X}{number // per_xlogid:08X}{number % per_xlogid:08X}"
        out[f"pg_wal/{name}"] = max(0, min(size, end - number * size))
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


async def take_snapshot(pgdata: Path, store: Store, job: str, *,
                        progress: Progress | None = None,
                        metrics: AgentMetrics | None = None,
                        generation: int = 0, keyring: Keyring | None = None,
                        streamed_to: int = 0) -> Manifest:
    """Upload a pause snapshot of a cleanly stopped PGDATA; returns its (stored) manifest.

    ``streamed_to``: the WAL position the agent's streamed deltas reached when PostgreSQL
    stopped (they stay in the store: ``restore.wal_after_pause`` tells them from WAL
    streamed after a resume by it).

    Afterwards the hash cache beside the files describes them (the next pause
    reads only what PostgreSQL wrote in between).
    """
    progress = progress or NoProgress()
    pgdata = await asyncio.to_thread(pgdata.absolute)  # Postgres tools run from /
    started = time.monotonic()
    try:
        control, pg_version = await asyncio.to_thread(check_stopped_pgdata, pgdata)
        skip = _EXCLUDE | await asyncio.to_thread(recycled_wal, pgdata, control)
        sid = new_id()

        async def finish(tree: Tree, stats: UploadStats, keys: KeySet) -> Manifest:
            return Manifest(
                kind="pause", id=sid, job=job, created_at=now_iso(), generation=generation,
                objects=[], files=tree.files, dirs=tree.dirs, key_id=keys.id,
                chunk_size=CHUNK_SIZE, pg_version=pg_version,
                system_identifier=control.system_identifier, timeline=control.timeline,
                start_lsn=control.checkpoint_lsn, uncompressed_size=stats.bytes,
                extra={"new_bytes": stats.new_bytes, "new_objects": stats.new_objects,
                       "read_bytes": stats.read_bytes, "files": stats.files,
                       "recycled_wal_skipped": sum(1 for k in skip if k.count("/") == 1
                                                   and k.startswith("pg_wal/")),
                       **({"streamed_to": format_lsn(streamed_to)} if streamed_to else {})})

        manifest, stats, cache = await write_snapshot(
            store, job, pgdata, skip.__contains__, finish, zero_past=wal_cuts(control),
            progress=progress, keyring=keyring,
            lsn_trusted=control.page_lsns_tell_changes)
        cache.lsn = parse_lsn(control.checkpoint_lsn)  # what the next pause compares with
        await asyncio.to_thread(write_cache, pgdata, cache)
    except BaseException:
        if metrics is not None:
            metrics.failures.labels(kind="snapshot").inc()
        raise
    if metrics is not None:
        metrics.snapshot_bytes.labels(kind="pause").inc(stats.new_bytes)
        metrics.snapshot_seconds.labels(kind="pause").observe(time.monotonic() - started)
    progress.finish(f"{stats.new_bytes / 1e6:,.1f} MB stored ({stats.new_objects} new objects "
                    f"of {stats.chunks}, {stats.read_bytes / 1e6:,.1f} MB read)")
    return manifest
