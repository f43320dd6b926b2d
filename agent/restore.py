"""Restore PGDATA from a stored snapshot: a pause snapshot as is, a base backup plus WAL.

A format 2 snapshot restores by delta (``cas.download``): into a directory
that may already hold much of it (``delta=True``), fetching only the
objects that differ, each verified against its keyed hash. A format 1
snapshot (one tar) is checked against its manifest (size, and sha256
computed while the archive streams into PGDATA). A snapshot that fails the check
leaves nothing behind: the directory is wiped before the next candidate is
tried, so a half-restored PGDATA that looks valid never exists. Without an
explicit id the newest snapshot wins and a bad one falls back to the one
before it, loudly; with an explicit id a bad snapshot is an error.

For a base backup, recovery is configured so that Postgres fetches the
archived WAL through ``jobmesh agent wal-fetch`` at its next start, up to
the end of the archive or to ``--target-time``.

Fencing (``fence.py``): a restore with a generation claims it first, and
ignores what a stale incarnation may have written. Only snapshots on the
newest timeline's history count (a snapshot past the point where its
timeline ended was written by an incarnation that kept running after
another had promoted). And when an incarnation started after the snapshot
it restores, the restore always recovers to a new timeline, even from a
pause snapshot with no WAL after it, so that it never writes WAL under the
names a survivor of that incarnation might still be writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .errors import AgentError
from .fence import claim, superseded
from .fetch import ProgressFor, Unusable, fetch_snapshot
from .manifest import (
    Manifest,
    ManifestError,
    job_prefix,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from .postgres import PostgresError, bin_dir, conf_quote, give_to_postgres, run_pg
from .progress import NoProgress, Progress
from .store import NotFound, Store, get_bytes
from .store.file import fsync_path
from .tarstream import prepare_empty_dir, wipe
from .timelines import off_history, read_newest_history
from .wal import restore_command
from .walnames import is_segment, parse_lsn, parse_segment, segment_of
from .walpartial import parse_delta_key

log = logging.getLogger("jobmesh.agent.restore")


@dataclass
class RestoreResult:
    manifest: Manifest
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, why)
    recovery_configured: bool = False
    bytes_restored: int = 0


def parse_target_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        t = datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError as exc:
        raise AgentError(f"bad --target-time {text!r}: use ISO 8601, e.g. "
                         "2026-11-26T07:23:00Z") from exc
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def backup_end_time(m: Manifest) -> datetime:
    """When a snapshot became restorable: a base backup's recorded end, else (a pause
    snapshot: its shutdown came just before) its manifest time. A point-in-time restore
    to a later time replays WAL from it: the WAL archived after a pause continues from
    its shutdown checkpoint, on its timeline, as after a base backup."""
    raw = str(m.extra.get("end_time") or m.extra.get("stop_time") or m.created_at)
    return parse_target_time(raw)


def recovery_settings(command: str, target: datetime | None) -> str:
    """postgresql.auto.conf lines: fetch WAL with ``command``, replay to the end of the
    archive (or to ``target``), then promote."""
    lines = [
        "# added by jobmesh agent restore",
        f"restore_command = {conf_quote(command)}",
        "recovery_target_timeline = 'latest'",
    ]
    if target is not None:
        lines += [f"recovery_target_time = {conf_quote(target.isoformat())}",
                  "recovery_target_action = 'promote'"]
    return "\n".join(lines) + "\n"


async def restore(pgdata: Path, store: Store, job: str, *, snapshot_id: str | None = None,
                  target_time: str | None = None, s3_endpoint: str | None = None,
                  progress: ProgressFor | Progress | None = None,
                  generation: int = 0, delta: bool = False) -> RestoreResult:
    """Restore ``job``'s newest (or the given) snapshot into an empty or missing PGDATA.

    With ``delta``, PGDATA may hold files already (a template copy, an older copy of
    the job): a format 2 snapshot then fetches only what differs; on failure PGDATA is
    emptied, as always.

    With a ``generation``, it is claimed first (``fence.Fenced`` if a newer one is).

    ``progress`` is a bar for the download, or a function making one per snapshot
    tried (restore then finishes each), so nothing is drawn before a download starts.
    """
    if progress is None:
        progress = NoProgress()
    pgdata = await asyncio.to_thread(pgdata.absolute)  # Postgres tools run from /
    target = parse_target_time(target_time) if target_time else None
    if snapshot_id == "latest":
        snapshot_id = None
    before = await claim(store, job, generation) if generation else []
    existed = await asyncio.to_thread(pgdata.exists)
    if delta:
        await asyncio.to_thread(pgdata.mkdir, mode=0o700, parents=True, exist_ok=True)
    else:
        await asyncio.to_thread(prepare_empty_dir, pgdata)
    try:
        return await _restore(pgdata, store, job, snapshot_id, target, s3_endpoint, progress,
                              before)
    except BaseException:
        await asyncio.to_thread(wipe, pgdata)
        if not existed:
            await asyncio.to_thread(shutil.rmtree, pgdata, True)
        raise


async def _restore(pgdata: Path, store: Store, job: str, snapshot_id: str | None,
                   target: datetime | None, s3_endpoint: str | None,
                   progress: ProgressFor | Progress, before: list[int]) -> RestoreResult:
    keys = [o.key for o in await store.list(f"{job_prefix(job)}snapshots/")]
    ids = snapshot_ids_with_manifest(keys, job)
    if not ids:
        raise AgentError(f"no snapshot of job {job!r} in {store.url}")
    skipped: list[tuple[str, str]] = []
    if snapshot_id is not None:
        if snapshot_id not in ids:
            raise AgentError(f"unknown snapshot id {snapshot_id!r} for job {job!r} "
                             f"(latest is {ids[-1]})")
        try:
            manifest = await _read_manifest(store, job, snapshot_id)
        except Unusable as exc:
            raise AgentError(str(exc)) from exc
        if target is not None:
            _check_pitr_base(manifest, target)
        try:
            restored = await fetch_snapshot(pgdata, store, job, manifest, progress)
        except Unusable as exc:
            raise AgentError(f"snapshot {snapshot_id} is unusable: {exc}") from exc
    else:
        manifest, restored = await _newest_usable(pgdata, store, job, ids, target, skipped,
                                                  progress)
    configured = False
    if (manifest.kind == "base" or superseded(manifest.generation, before)
            or await wal_after_pause(store, job, manifest)):
        # wal-fetch as the Postgres OS user (which may need another interpreter: see wal.py)
        endpoint = s3_endpoint or getattr(store, "endpoint", None)  # S3 only; may be from env
        command = await asyncio.to_thread(restore_command, store.url, job, s3_endpoint=endpoint)
        await asyncio.to_thread(_configure_recovery, pgdata, recovery_settings(command, target))
        configured = True
    if manifest.chunked:  # every file written was synced as it was written
        await asyncio.to_thread(_sync_few, pgdata, ["postgresql.auto.conf", "recovery.signal",
                                                     "backup_label", "pg_wal", "."])
    else:
        await asyncio.to_thread(_sync_to_disk, pgdata)
    return RestoreResult(manifest, skipped, configured, restored)


async def wal_after_pause(store: Store, job: str, manifest: Manifest) -> bool:
    """Was WAL archived after this pause snapshot (the job ran again, then was lost)?

    Then the snapshot alone is not the newest point: Postgres replays that WAL
    from the snapshot's shutdown checkpoint, as from a base backup. A plain
    pause/resume finds none and starts without recovery (and no new timeline).
    """
    if manifest.kind != "pause" or not manifest.start_lsn:
        return False
    first = segment_of(manifest.timeline, parse_lsn(manifest.start_lsn))
    streamed_to = parse_lsn(str(manifest.extra.get("streamed_to") or "0/0"))
    for obj in await store.list(f"{job_prefix(job)}wal/"):
        name = obj.key.rsplit("/", 1)[-1].removesuffix(".zst")
        if (delta := parse_delta_key(job, obj.key)) is not None:
            name = delta.segment
            # The pausing agent's own deltas stay in the store (agents do not delete):
            # they end at or before where its stream stood at the pause; what a later
            # generation, or the same agent after a resume, streamed reaches past it.
            if (delta.generation <= manifest.generation and parse_segment(name) <= first
                    and (not streamed_to or
                         parse_segment(name).start_lsn + delta.end <= streamed_to)):
                continue
        if not is_segment(name):
            continue
        if parse_segment(name) >= first:  # Segment orders by timeline, then number
            return True
    return False


def _sync_few(pgdata: Path, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            fsync_path(pgdata / name)


def _sync_to_disk(pgdata: Path) -> None:
    """fsync the restored tree, as pg_basebackup does: a pause snapshot starts as a cleanly
    shut down cluster, which Postgres never syncs itself, so a host crash soon after the
    restore could otherwise leave torn files in a PGDATA that looks valid."""
    try:
        run_pg([str(bin_dir() / "initdb"), "--sync-only", "-D", str(pgdata)], timeout=3600)
    except PostgresError as exc:
        raise AgentError(f"cannot sync the restored {pgdata} to disk: {exc}") from exc


async def _newest_usable(pgdata: Path, store: Store, job: str, ids: list[str],
                         target: datetime | None, skipped: list[tuple[str, str]],
                         progress: ProgressFor | Progress) -> tuple[Manifest, int]:
    tried_any = False
    history = await read_newest_history(store, job)
    for sid in reversed(ids):
        try:
            manifest = await _read_manifest(store, job, sid)
            if target is not None and backup_end_time(manifest) >= target:
                continue  # consistent only after T
            if (why := off_history(manifest, history)) is not None:
                skipped.append((sid, why))
                log.warning("skipping snapshot %s: %s", sid, why)
                continue
            tried_any = True
            return manifest, await fetch_snapshot(pgdata, store, job, manifest, progress)
        except Unusable as exc:
            skipped.append((sid, str(exc)))
            log.warning("skipping snapshot %s: %s; trying the previous one", sid, exc)
            await asyncio.to_thread(wipe, pgdata)
    if target is not None and not tried_any:
        raise AgentError(f"no snapshot of job {job!r} was taken before {target.isoformat()}: "
                         "a point-in-time restore replays WAL from one")
    raise AgentError(f"no usable snapshot of job {job!r} in {store.url}: "
                     + "; ".join(f"{sid}: {why}" for sid, why in skipped))


def _check_pitr_base(m: Manifest, target: datetime) -> None:
    if backup_end_time(m) >= target:
        raise AgentError(f"{m.kind} snapshot {m.id} is of {backup_end_time(m).isoformat()}, "
                         f"not before {target.isoformat()}")


async def _read_manifest(store: Store, job: str, sid: str) -> Manifest:
    key = snapshot_manifest_key(job, sid)
    try:
        m = Manifest.from_json(await get_bytes(store, key))
    except NotFound as exc:
        raise Unusable(f"{key} disappeared") from exc
    except ManifestError as exc:
        raise Unusable(f"{key}: {exc}") from exc
    if m.kind not in ("pause", "base"):
        raise Unusable(f"{key}: not a snapshot manifest (kind {m.kind!r})")
    return m


def _configure_recovery(pgdata: Path, settings: str) -> None:
    """Archive recovery at next start: empty pg_wal, recovery.signal, restore_command."""
    wal = pgdata / "pg_wal"
    (wal / "archive_status").mkdir(parents=True, exist_ok=True)
    wal.chmod(0o700)
    (pgdata / "recovery.signal").touch()
    auto = pgdata / "postgresql.auto.conf"
    existing = auto.read_text() if auto.exists() else ""
    sep = "" if not existing or existing.endswith("\n") else "\n"
    auto.write_text(existing + sep + settings)
    for path in (wal, pgdata / "recovery.signal", auto):
        give_to_postgres(path)
    os.chmod(auto, 0o600)
