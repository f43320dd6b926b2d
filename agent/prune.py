"""``prune``: keep a job's newest snapshots and delete what they do not need.

Pruning deletes a snapshot's manifest before its data, so a crash mid-prune
leaves orphaned data (which a later prune removes), never a manifest that
points to nothing. WAL goes only when no kept snapshot can need it, and an
orphaned object goes only when it is older than the newest manifest of its
kind (a newer one may be an upload in progress).
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import AgentError
from .inventory import full_key, gather_bounded, read_listing, wal_name
from .manifest import Manifest, job_prefix, snapshot_manifest_key
from .store import Store
from .walnames import WalNameError, parse_lsn, parse_segment, segment_of


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
    """The segment number a WAL-area object belongs to; None for history files and others."""
    if not key.startswith(f"{job_prefix(job)}wal/") or "/wal/history/" in key:
        return None
    name = wal_name(key)
    try:
        return parse_segment(name[:24]).number if len(name) >= 24 else None
    except WalNameError:
        return None


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

    still_used = {full_key(job, o.key) for s in kept for o in listing.snapshots[s].objects}
    for sid in dropped:
        manifest_key = snapshot_manifest_key(job, sid)
        await delete([manifest_key])  # first: from here on the snapshot does not exist
        data = {full_key(job, o.key) for o in listing.snapshots[sid].objects}
        data |= {k for k in listing.objects if k.startswith(f"{job}/snapshots/{sid}/")}
        data &= listing.objects.keys()
        await delete(sorted(data - still_used - {manifest_key}))

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

