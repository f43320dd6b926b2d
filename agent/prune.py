"""``prune``: keep a job's newest snapshots and delete what they do not need.

Two policies over the same steps: ``prune`` (the CLI's ``--keep N``: the
newest N snapshots of either kind) and ``retain`` (what ``agent serve`` runs
after every base backup: the newest base backups, every pause snapshot, and
the WAL a restore from any of those could replay).

Pruning deletes a snapshot's manifest before its data, so a crash mid-prune
leaves orphaned data (which a later prune removes), never a manifest that
points to nothing. WAL goes only when no kept snapshot can need it, and an
orphaned object goes only when it is older than the newest manifest of its
kind (a newer one may be an upload in progress).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from .errors import AgentError
from .inventory import Listing, full_key, gather_bounded, read_listing, wal_name
from .manifest import Manifest, job_prefix, snapshot_manifest_key
from .store import Store
from .walnames import WalNameError, parse_lsn, parse_segment, segment_of
from .walpartial import parse_delta_key


def wal_cutoff(kept: Iterable[Manifest]) -> int | None:
    """The segment number below which no kept snapshot needs WAL (None: keep all WAL).

    A base backup needs WAL from its ``start_wal``; a pause snapshot needs none,
    but WAL from its shutdown checkpoint on is what a later point-in-time
    recovery from it replays. Positions are compared without the timeline: a
    snapshot never needs WAL below its own start on any timeline, and after a
    point-in-time restore a newer snapshot may start lower than an older one.
    """
    starts = []
    for m in kept:
        try:
            if m.start_wal:
                starts.append(parse_segment(m.start_wal).number)
            elif m.start_lsn and m.timeline:
                starts.append(segment_of(m.timeline, parse_lsn(m.start_lsn)).number)
            else:
                return None  # we cannot tell what it needs
        except WalNameError:
            return None
    return min(starts) if starts else None


def _wal_position(job: str, key: str) -> int | None:
    """The segment number a WAL-area object belongs to (segments, streamed deltas, backup
    history, an old timeline's last partial segment); None for history files and others."""
    if not key.startswith(f"{job_prefix(job)}wal/") or "/wal/history/" in key:
        return None
    if (delta := parse_delta_key(job, key)) is not None:
        return parse_segment(delta.segment).number
    name = wal_name(key)
    try:
        return parse_segment(name[:24]).number if len(name) >= 24 else None
    except WalNameError:
        return None


async def _drop_snapshots(job: str, listing: Listing, kept: Iterable[str],
                          dropped: Iterable[str],
                          delete: Callable[[list[str]], Awaitable[None]]) -> None:
    """Delete each dropped snapshot: its manifest first (from then on it does not exist),
    then its objects that no kept snapshot also lists."""
    still_used = {full_key(job, o.key) for s in kept for o in listing.snapshots[s].objects}
    for sid in dropped:
        manifest_key = snapshot_manifest_key(job, sid)
        await delete([manifest_key])
        data = {full_key(job, o.key) for o in listing.snapshots[sid].objects}
        data |= {k for k in listing.objects if k.startswith(f"{job}/snapshots/{sid}/")}
        data &= listing.objects.keys()
        await delete(sorted(data - still_used - {manifest_key}))


async def prune(store: Store, job: str, keep: int, *, dry_run: bool = False) -> list[str]:
    """Keep the newest ``keep`` snapshots (pause and base together); returns deleted keys.

    Deletes, in this order: each older snapshot (manifest first, then its
    data), WAL no kept snapshot needs, and orphaned objects older than the
    newest manifest of their kind (newer ones may be uploads in progress).
    """
    if keep < 1:
        raise AgentError("--keep must be at least 1: prune never deletes the newest snapshot")
    listing = await read_listing(store, job)
    sids = list(listing.snapshots)
    kept, dropped = sids[-keep:], sids[:-keep]
    deleted: list[str] = []

    async def delete(keys: list[str]) -> None:
        if not dry_run:
            await gather_bounded([store.delete(k) for k in keys])
        deleted.extend(keys)

    await _drop_snapshots(job, listing, kept, dropped, delete)

    cutoff = wal_cutoff(listing.snapshots[s] for s in kept)
    if cutoff is not None:
        old_wal = [k for k in listing.objects
                   if (pos := _wal_position(job, k)) is not None and pos < cutoff]
        await delete(sorted(old_wal))

    newest = {"snapshots": sids[-1] if sids else None,
              "dumps": next(reversed(listing.dumps), None)}
    gone = set(deleted)
    orphans = [info.key for area, oid, info in listing.orphans()
               if (cut := newest[area]) is not None and oid < cut and info.key not in gone]
    await delete(sorted(orphans))
    return deleted



async def drop_by_retention(store: Store, job: str, listing: Listing, keep: set[str], *,
                            dry_run: bool = False) -> list[str]:
    """Drop the snapshots not in ``keep`` (the controller's retention decided), the WAL no
    kept snapshot can replay, and orphaned objects older than the newest manifest of their
    kind; returns the deleted keys. Content-addressed objects are the collector's.

    WAL is kept from the oldest kept snapshot's start (base backup) or shutdown checkpoint
    (pause snapshot) on: a point-in-time restore may replay from any kept snapshot.
    """
    sids = list(listing.snapshots)
    kept_ids = [s for s in sids if s in keep]
    deleted: list[str] = []

    async def delete(keys: list[str]) -> None:
        if keys and not dry_run:
            await store.delete_many(keys)
        deleted.extend(keys)

    await _drop_snapshots(job, listing, kept_ids, [s for s in sids if s not in keep], delete)
    # every kept snapshot may be replayed from (a point-in-time restore): WAL from the
    # oldest one's start on stays
    needs = [listing.snapshots[s] for s in kept_ids]
    cutoff = wal_cutoff(needs) if needs else None
    if cutoff is not None:
        await delete(sorted(k for k in listing.objects
                            if (pos := _wal_position(job, k)) is not None and pos < cutoff))
    newest = {"snapshots": sids[-1] if sids else None,
              "dumps": next(reversed(listing.dumps), None)}
    gone = set(deleted)
    await delete(sorted(info.key for area, oid, info in listing.orphans()
                        if (cut := newest[area]) is not None and oid < cut
                        and info.key not in gone))
    gone = set(deleted)
    await delete(sorted(k for k in superseded_deltas(job, listing.objects) if k not in gone))
    return deleted


def superseded_deltas(job: str, keys: Iterable[str]) -> list[str]:
    """The streamed deltas of segments the archive has stored whole (the agent leaves them:
    it never deletes): a restore reads the whole segment, never its deltas."""
    keys = list(keys)
    whole = {wal_name(k) for k in keys if k.startswith(f"{job_prefix(job)}wal/")
             and "/wal/partial/" not in k}
    return [k for k in keys
            if (d := parse_delta_key(job, k)) is not None and d.segment in whole]


async def retain(store: Store, job: str, keep_base: int = 2, *,
                 dry_run: bool = False) -> list[str]:
    """Keep the newest ``keep_base`` base backups and every pause snapshot; returns the
    deleted keys.

    WAL is kept from the older of the oldest kept base backup's start and the newest
    pause snapshot's shutdown checkpoint (WAL archived after a pause is what a restore
    of that snapshot replays: ``restore.wal_after_pause``). Timeline history files are
    always kept (tiny, and recovery to the latest timeline reads them all). Older
    pause snapshots' retention is not decided here.
    """
    if keep_base < 1:
        raise AgentError("retention keeps at least one base backup")
    listing = await read_listing(store, job)
    bases = [sid for sid, m in listing.snapshots.items() if m.kind == "base"]
    pauses = [sid for sid, m in listing.snapshots.items() if m.kind != "base"]
    if not bases:
        return []
    kept_bases, dropped = bases[-keep_base:], bases[:-keep_base]
    kept = [*kept_bases, *pauses]
    deleted: list[str] = []

    async def delete(keys: list[str]) -> None:
        if keys and not dry_run:
            await store.delete_many(keys)
        deleted.extend(keys)

    await _drop_snapshots(job, listing, kept, dropped, delete)

    needs = [listing.snapshots[kept_bases[0]]]
    if pauses:
        needs.append(listing.snapshots[pauses[-1]])
    cutoff = wal_cutoff(needs)
    if cutoff is not None:
        await delete(sorted(k for k in listing.objects
                            if (pos := _wal_position(job, k)) is not None and pos < cutoff))
    return deleted
