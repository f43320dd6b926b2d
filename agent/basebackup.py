"""Base backups of a running PostgreSQL, for recovery after a crash.

``pg_backup_start`` (a fast checkpoint), then PGDATA's new objects uploaded
(``cas``: only chunks the store lacks) while Postgres keeps writing, then
``pg_backup_stop``, all on one session
(a non-exclusive backup lives as long as its session: if we die, Postgres
forgets it). The copy is fuzzy; WAL replay from the start checkpoint to
the stop position makes it consistent, so those segments must be in the
store before the backup may count: we push them from the spool ourselves
rather than trust that an archiver is running, then write the manifest
last.

``pg_backup_stop`` hands back the ``backup_label`` only at the end, after
the tar's members are written, so the label is its own small object
(``snapshots/<id>/backup_label``) listed in the manifest; a restore writes
it into PGDATA before starting recovery. Without it Postgres would start
from the latest checkpoint in pg_control, which may be newer than pages
copied earlier, and silently corrupt the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .cas import CHUNK_SIZE, Tree, UploadStats, write_snapshot
from .cas.keys import KeySet
from .errors import AgentError
from .manifest import Manifest, ObjectEntry, job_prefix, new_id, now_iso, wal_key
from .progress import NoProgress, Progress
from .store import Store, put_bytes
from .wal import push_segment
from .walnames import format_lsn, parse_lsn, segment_ending_at, segment_range

if TYPE_CHECKING:
    import asyncpg

    from .metrics import AgentMetrics

# What pg_basebackup leaves out (PostgreSQL 15, src/backend/backup/basebackup.c):
# directories whose contents are rebuilt at startup, and files that describe only
# the running server or would confuse recovery.
_EMPTY_DIRS = frozenset({"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify",
                         "pg_serial", "pg_snapshots", "pg_subtrans"})
_TOP_FILES = frozenset({"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map",
                        "backup_manifest", "postgresql.auto.conf.tmp", "current_logfiles.tmp"})

_START_WAL = re.compile(r"^START WAL LOCATION: (\S+) \(file ([0-9A-F]{24})\)$", re.M)
_START_TIMELINE = re.compile(r"^START TIMELINE: (\d+)$", re.M)


def backup_label_key(job: str, sid: str) -> str:
    return f"{job}/snapshots/{sid}/backup_label"


def excluded(rel: str) -> bool:
    """Whether a PGDATA path (relative, '/'-separated) stays out of a base backup."""
    parts = rel.split("/")
    name = parts[-1]
    if len(parts) == 1 and (name in _TOP_FILES or name.startswith(".s.PGSQL.")):
        return True  # .s.PGSQL.<port>.lock: the socket lock, when sockets live in PGDATA
    if name.startswith("pg_internal.init") or name.startswith("pgsql_tmp"):
        return True
    if parts[0] in _EMPTY_DIRS and len(parts) > 1:
        # keep pg_wal/archive_status itself, as pg_basebackup does
        return not (parts[0] == "pg_wal" and rel == "pg_wal/archive_status")
    return False


def _system_identifier(pgdata: Path) -> str:
    """The database system identifier in PGDATA's pg_control (its first 8 bytes)."""
    try:
        with (pgdata / "global" / "pg_control").open("rb") as f:
            return str(int.from_bytes(f.read(8), sys.byteorder))
    except OSError as exc:
        raise AgentError(f"{pgdata} is not a PostgreSQL data directory: {exc}") from exc


def parse_label(label: str) -> tuple[int, str, str]:
    """(timeline, start LSN, start segment) from a backup_label."""
    wal, tli = _START_WAL.search(label), _START_TIMELINE.search(label)
    if wal is None or tli is None:
        raise AgentError("pg_backup_stop returned a backup_label we cannot read")
    return int(tli.group(1)), wal.group(1), wal.group(2)


async def take_base_backup(dsn: str, pgdata: Path, store: Store, job: str, *,
                           progress: Progress | None = None,
                           metrics: AgentMetrics | None = None,
                           wal_timeout: float = 300.0, generation: int = 0) -> Manifest:
    """Back up a running server (reachable at ``dsn``, a postgresql:// URI, as a superuser
    or a role allowed to run pg_backup_start) whose data directory is ``pgdata``.

    Returns the stored manifest. ``wal_timeout`` bounds the wait for the WAL the
    backup needs to reach the store.
    """
    import asyncpg  # only here: the other agent commands start faster without it

    progress = progress or NoProgress()
    started = time.monotonic()
    try:
        pg_version = (await asyncio.to_thread((pgdata / "PG_VERSION").read_text)).strip()
    except OSError as exc:
        raise AgentError(f"{pgdata} is not a PostgreSQL data directory: {exc}") from exc
    try:
        conn = await asyncpg.connect(dsn, server_settings={
            "application_name": "jobmesh base backup", "statement_timeout": "0"})
    except (OSError, asyncpg.PostgresError) as exc:
        raise AgentError(f"cannot connect for a base backup: {exc}") from exc
    try:
        manifest = await _backup(conn, pgdata, pg_version, store, job, progress, wal_timeout,
                                 generation)
    except Exception:  # a cancellation (the job is pausing) is no failure
        if metrics is not None:
            metrics.failures.labels(kind="base_backup").inc()
        raise
    finally:
        await conn.close()  # ends the backup on the server too, if it is still open
    size = manifest.stored_size
    if metrics is not None:
        metrics.snapshot_bytes.labels(kind="base").inc(size)
        metrics.snapshot_seconds.labels(kind="base").observe(time.monotonic() - started)
    progress.finish(f"{size / 1e6:,.1f} MB stored, WAL {manifest.start_wal}..{manifest.end_wal}")
    return manifest


async def _backup(conn: asyncpg.Connection, pgdata: Path, pg_version: str, store: Store, job: str,
                  progress: Progress, wal_timeout: float, generation: int) -> Manifest:
    import asyncpg

    try:
        archive_mode = await conn.fetchval("select current_setting('archive_mode')")
        library = await conn.fetchval("select current_setting('archive_library')")
        spool = await conn.fetchval(
            "select current_setting('basic_archive.archive_directory', true)")
        system_id = await conn.fetchval(
            "select system_identifier::text from pg_control_system()")
        tablespaces = await conn.fetchval(
            "select count(*) from pg_tablespace where spcname not in ('pg_default', 'pg_global')")
    except asyncpg.PostgresError as exc:
        raise AgentError(f"cannot inspect the server: {exc}") from exc
    if archive_mode == "off":
        raise AgentError("archive_mode is off: a base backup is useless without archived WAL "
                         "(use `agent init`, or set archive_mode = on)")
    if tablespaces:
        raise AgentError("the server has tablespaces outside PGDATA; they are not backed up")
    ours = await asyncio.to_thread(_system_identifier, pgdata)
    if ours != system_id:
        raise AgentError(f"the server at the DSN (system {system_id}) does not run on "
                         f"{pgdata} (system {ours})")
    spool_dir = Path(spool) if library == "basic_archive" and spool else None

    sid = new_id()
    try:
        await conn.fetchval("select pg_backup_start($1, fast => true)::text", f"jobmesh {sid}")
    except asyncpg.PostgresError as exc:
        raise AgentError(f"pg_backup_start failed: {exc}") from exc

    async def finish(tree: Tree, stats: UploadStats, keys: KeySet) -> Manifest:
        try:
            row = await conn.fetchrow("select lsn::text as lsn, labelfile from "
                                      "pg_backup_stop(wait_for_archive => true)",
                                      timeout=wal_timeout)
            # The server's clock, which recovery_target_time is compared with: a
            # point-in-time restore can only aim after this.
            end_time = await conn.fetchval("select clock_timestamp()")
        except asyncpg.PostgresError as exc:
            raise AgentError(f"pg_backup_stop failed: {exc}") from exc
        except TimeoutError as exc:
            raise AgentError(f"pg_backup_stop waited {wal_timeout:.0f} s for Postgres to "
                             "archive the backup's WAL: is archiving failing? (see "
                             "pg_stat_archiver)") from exc
        assert row is not None
        label: str = row["labelfile"]
        timeline, start_lsn, start_wal = parse_label(label)
        end_lsn = format_lsn(parse_lsn(row["lsn"]))
        end_wal = segment_ending_at(timeline, parse_lsn(end_lsn)).name
        label_key = backup_label_key(job, sid)
        label_obj = await put_bytes(store, label_key, label.encode())
        await wait_for_wal(store, job, segment_range(start_wal, end_wal), spool_dir,
                           timeout=wal_timeout)
        rel = len(job_prefix(job))
        return Manifest(
            kind="base", id=sid, job=job, created_at=now_iso(), generation=generation,
            objects=[ObjectEntry(label_key[rel:], label_obj.size, label_obj.sha256)],
            files=tree.files, dirs=tree.dirs, key_id=keys.id, chunk_size=CHUNK_SIZE,
            pg_version=pg_version, system_identifier=system_id, timeline=timeline,
            start_lsn=start_lsn, end_lsn=end_lsn, start_wal=start_wal, end_wal=end_wal,
            uncompressed_size=stats.bytes,
            extra={"new_bytes": stats.new_bytes, "new_objects": stats.new_objects,
                   "read_bytes": stats.read_bytes, "files": stats.files,
                   "backup_label": label_key[rel:], "end_time": end_time.isoformat()},
        )

    # Files the hash cache vouches for did not change since PostgreSQL last started (it
    # was stopped when the cache was written): what changes during the copy is in WAL.
    manifest, _, _ = await write_snapshot(store, job, pgdata, excluded, finish,
                                          progress=progress)
    return manifest


async def wait_for_wal(store: Store, job: str, segments: list[str], spool: Path | None, *,
                       timeout: float) -> None:
    """Return once every named segment is in the store, pushing from the spool what is
    still there (an archiver may be doing the same: pushes are idempotent)."""
    deadline = time.monotonic() + timeout
    missing = list(segments)
    while missing:
        prefixes = sorted({wal_key(job, s).rsplit("/", 1)[0] + "/" for s in missing})
        stored = {o.key for p in prefixes for o in await store.list(p)}
        missing = [s for s in missing if wal_key(job, s) not in stored]
        if spool is not None:
            for name in list(missing):
                with contextlib.suppress(FileNotFoundError):  # an archiver got it meanwhile
                    await push_segment(store, job, spool / name)
                    missing.remove(name)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AgentError(f"WAL {missing[0]} needed by the backup never reached the store "
                             f"(is the archiver running?)")
        await asyncio.sleep(0.2)  # waiting on Postgres's archiver: no event to wait on
