"""What a job has in the store, whether it is intact, and pruning what is no longer needed.

Only manifests make objects count: ``list`` shows snapshots and dumps that
have one, and everything else under ``snapshots/`` and ``dumps/`` is an
"orphaned object" (an upload that died, or one still in progress). WAL
segments have no manifests; they count by name.

Pruning deletes a snapshot's manifest before its data, so a crash mid-prune
leaves orphaned data (which a later prune removes), never a manifest that
points to nothing. WAL goes only when no kept snapshot can need it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field

import zstandard

from .cli import add_store_arguments
from .errors import AgentError
from .manifest import (
    Manifest,
    ManifestError,
    dump_ids_with_manifest,
    dump_manifest_key,
    job_prefix,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from .store import Digest, NotFound, ObjectInfo, Store, StoreError, get_bytes, open_store
from .walnames import WalNameError, is_segment, parse_lsn, parse_segment, segment_of

PARALLEL = 8  # objects verified or deleted at once


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    kind: str
    size: int  # stored (compressed) bytes
    created_at: str
    timeline: int
    start_lsn: str
    end_lsn: str
    start_wal: str
    end_wal: str
    pg_version: str


@dataclass(frozen=True)
class DumpInfo:
    id: str
    size: int
    created_at: str
    pg_version: str


@dataclass(frozen=True)
class WalRange:
    """The archived segments of one timeline; ``missing`` counts the holes in between."""

    timeline: int
    first: str
    last: str
    segments: int
    size: int
    missing: int


@dataclass
class Inventory:
    job: str
    store: str
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    dumps: list[DumpInfo] = field(default_factory=list)
    wal: list[WalRange] = field(default_factory=list)
    orphaned: list[ObjectInfo] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # manifests that do not parse

    def to_json(self) -> str:
        """Orphaned objects are counted, never listed: they are not part of the job."""
        out = asdict(self)
        out["orphaned"] = {"count": len(self.orphaned),
                           "bytes": sum(o.size for o in self.orphaned)}
        return json.dumps(out, indent=2)


# --- reading the store ---------------------------------------------------------------


@dataclass
class _Listing:
    """One listing of a job's prefix, split by the layout, with every manifest read."""

    job: str
    objects: dict[str, ObjectInfo]
    snapshots: dict[str, Manifest]  # id -> manifest, oldest first
    dumps: dict[str, Manifest]
    wal: list[ObjectInfo]  # segments only (history and other WAL files are kept as they are)
    unreadable: list[str]

    def referenced(self) -> set[str]:
        keys = set()
        for sid, man in self.snapshots.items():
            keys.add(snapshot_manifest_key(self.job, sid))
            keys.update(full_key(self.job, o.key) for o in man.objects)
        for did, man in self.dumps.items():
            keys.add(dump_manifest_key(self.job, did))
            keys.update(full_key(self.job, o.key) for o in man.objects)
        return keys

    def orphans(self) -> list[tuple[str, str, ObjectInfo]]:
        """(area, id, object) for every snapshot or dump object no manifest references."""
        used = self.referenced()
        # A manifest we cannot read may be a newer agent's: leave its objects alone.
        unknown = {_area_id(self.job, k) for k in self.unreadable}
        out = []
        for key, info in self.objects.items():
            area_id = _area_id(self.job, key)
            if area_id is not None and key not in used and area_id not in unknown:
                out.append((*area_id, info))
        return out


def full_key(job: str, key: str) -> str:
    """Manifest entries name objects relative to the job prefix."""
    return f"{job_prefix(job)}{key}"


def _area_id(job: str, key: str) -> tuple[str, str] | None:
    """("snapshots", id) or ("dumps", id) for a key in those areas, else None."""
    rest = key[len(job_prefix(job)):]
    area, _, tail = rest.partition("/")
    if area == "snapshots" and tail:
        return area, tail.split("/", 1)[0]
    if area == "dumps" and tail:
        return area, tail.split("/", 1)[0].split(".", 1)[0]
    return None


async def _read_listing(store: Store, job: str) -> _Listing:
    objects = {o.key: o for o in await store.list(job_prefix(job))}
    keys = list(objects)
    unreadable: list[str] = []

    async def read(key: str) -> Manifest | None:
        try:
            return Manifest.from_json(await get_bytes(store, key))
        except ManifestError:
            unreadable.append(key)
        except NotFound:
            pass  # pruned between listing and reading
        return None

    sids = snapshot_ids_with_manifest(keys, job)
    dids = dump_ids_with_manifest(keys, job)
    sman = await _bounded([read(snapshot_manifest_key(job, s)) for s in sids])
    dman = await _bounded([read(dump_manifest_key(job, d)) for d in dids])
    wal_prefix = f"{job_prefix(job)}wal/"
    wal = [o for k, o in objects.items()
           if k.startswith(wal_prefix) and is_segment(_wal_name(k))]
    return _Listing(
        job, objects,
        {s: m for s, m in zip(sids, sman, strict=True) if m is not None},
        {d: m for d, m in zip(dids, dman, strict=True) if m is not None},
        wal, sorted(unreadable))


def _wal_name(key: str) -> str:
    """``job/wal/00000001/000000010000000000000003.zst`` -> the segment name."""
    name = key.rsplit("/", 1)[-1]
    return name[:-len(".zst")] if name.endswith(".zst") else name


async def _bounded(aws: Iterable[Awaitable[object]], limit: int = PARALLEL) -> list:
    slots = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[object]) -> object:
        async with slots:
            return await aw

    return await asyncio.gather(*(one(a) for a in aws))


def _stored_size(man: Manifest) -> int:
    return sum(o.size for o in man.objects)


def wal_ranges(names: Iterable[tuple[str, int]]) -> list[WalRange]:
    """Group (segment name, size) pairs into one range per timeline, counting holes."""
    by_tli: dict[int, list[tuple[int, int, str]]] = {}
    for name, size in names:
        seg = parse_segment(name)
        by_tli.setdefault(seg.timeline, []).append((seg.number, size, name))
    out = []
    for tli, segs in sorted(by_tli.items()):
        segs.sort()
        span = segs[-1][0] - segs[0][0] + 1
        out.append(WalRange(tli, segs[0][2], segs[-1][2], len(segs),
                            sum(s for _, s, _ in segs), span - len(segs)))
    return out


async def inventory(store: Store, job: str) -> Inventory:
    """Snapshots and dumps with manifests, WAL per timeline, and the orphaned objects."""
    listing = await _read_listing(store, job)
    inv = Inventory(job=job, store=store.url, unreadable=listing.unreadable)
    for sid, m in listing.snapshots.items():
        inv.snapshots.append(SnapshotInfo(
            sid, m.kind, _stored_size(m), m.created_at, m.timeline, m.start_lsn, m.end_lsn,
            m.start_wal, m.end_wal, m.pg_version))
    for did, m in listing.dumps.items():
        inv.dumps.append(DumpInfo(did, _stored_size(m), m.created_at, m.pg_version))
    inv.wal = wal_ranges((_wal_name(o.key), o.size) for o in listing.wal)
    inv.orphaned = [info for _, _, info in listing.orphans()]
    return inv


# --- verify --------------------------------------------------------------------------


async def verify(store: Store, job: str) -> list[str]:
    """Re-download everything and check it; returns one line per problem (empty: all good)."""
    listing = await _read_listing(store, job)
    problems = [f"{key}: unreadable manifest" for key in listing.unreadable]
    checks: list[Awaitable[str | None]] = []
    for what, mans in (("snapshot", listing.snapshots), ("dump", listing.dumps)):
        for mid, man in mans.items():
            for entry in man.objects:
                checks.append(_check_object(store, f"{what} {mid}", full_key(job, entry.key),
                                            entry.size, entry.sha256))
    wal_prefix = f"{job_prefix(job)}wal/"
    for key in listing.objects:
        if key.startswith(wal_prefix) and key.endswith(".zst"):
            checks.append(_check_zstd(store, key))
    problems += [p for p in await _bounded(checks) if p]
    return problems


async def _check_object(store: Store, owner: str, key: str, size: int,
                        sha256: str) -> str | None:
    digest = Digest()
    try:
        async with contextlib.aclosing(store.get(key)) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                digest.update(chunk)
    except NotFound:
        return f"{key}: missing (listed in {owner})"
    except StoreError as exc:
        return f"{key}: cannot read: {exc}"
    if digest.size != size:
        return f"{key}: {digest.size} bytes, {owner} says {size}"
    if digest.hexdigest() != sha256:
        return f"{key}: sha256 mismatch ({owner})"
    return None


async def _check_zstd(store: Store, key: str) -> str | None:
    """A WAL object must be one or more complete zstd frames."""
    dec = zstandard.ZstdDecompressor()
    obj = dec.decompressobj()
    in_frame = False  # bytes of a frame were fed but its end was not seen yet
    seen = 0
    try:
        async with contextlib.aclosing(store.get(key)) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                seen += len(chunk)
                while chunk:
                    obj.decompress(chunk)
                    in_frame = True
                    chunk = b""
                    if obj.eof:  # a frame ended; whatever follows is the next frame
                        chunk, obj, in_frame = obj.unused_data, dec.decompressobj(), False
    except NotFound:
        return None  # pruned since we listed it
    except StoreError as exc:
        return f"{key}: cannot read: {exc}"
    except zstandard.ZstdError as exc:
        return f"{key}: not valid zstd: {exc}"
    if seen == 0:
        return f"{key}: empty object"
    if in_frame:
        return f"{key}: truncated zstd frame"
    return None


# --- prune ---------------------------------------------------------------------------


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
    name = _wal_name(key)
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
    listing = await _read_listing(store, job)
    sids = list(listing.snapshots)
    kept, dropped = sids[-keep:], sids[:-keep]
    deleted: list[str] = []

    async def delete(keys: list[str]) -> None:
        if not dry_run:
            await _bounded([store.delete(k) for k in keys])
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
               if newest[area] is not None and oid < newest[area] and info.key not in gone]
    await delete(sorted(orphans))
    return deleted


# --- CLI ------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_inventory(inv: Inventory) -> str:
    lines = [f"job {inv.job} in {inv.store}", f"snapshots: {len(inv.snapshots)}"]
    for s in inv.snapshots:
        lsn = s.start_lsn + (f"..{s.end_lsn}" if s.end_lsn else "")
        wal = f"  wal {s.start_wal}..{s.end_wal}" if s.start_wal else ""
        lines.append(f"  {s.id}  {s.kind:<5}  {_mb(s.size):>11}  {s.created_at}  "
                     f"timeline {s.timeline}  lsn {lsn or '-'}{wal}")
    lines.append(f"dumps: {len(inv.dumps)}")
    for d in inv.dumps:
        lines.append(f"  {d.id}  {_mb(d.size):>11}  {d.created_at}  "
                     f"postgres {d.pg_version or '?'}")
    lines.append(f"WAL: {sum(r.segments for r in inv.wal)} segments")
    for r in inv.wal:
        gap = f", {r.missing} MISSING" if r.missing else ""
        lines.append(f"  timeline {r.timeline}: {r.first}..{r.last}  "
                     f"{r.segments} segments, {_mb(r.size)}{gap}")
    lines.append(f"orphaned objects: {len(inv.orphaned)} "
                 f"({_mb(sum(o.size for o in inv.orphaned))})")
    lines += [f"unreadable manifest: {k}" for k in inv.unreadable]
    return "\n".join(lines)


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="snapshots, dumps and WAL of a job in the store")
    add_store_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=lambda args: _run(_list, args))

    p = sub.add_parser("verify", help="re-download every stored object and check it",
                       description="Check every object a manifest lists (size and sha256) "
                                   "and that every WAL segment decompresses; exit 1 naming "
                                   "each bad object.")
    add_store_arguments(p)
    p.set_defaults(run=lambda args: _run(_verify, args))

    p = sub.add_parser("prune", help="delete all but the newest N snapshots and the WAL "
                                     "they do not need")
    add_store_arguments(p)
    p.add_argument("--keep", type=int, required=True, metavar="N",
                   help="snapshots to keep, pause and base backups counted together")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.set_defaults(run=lambda args: _run(_prune, args))


def _run(command: Callable[[Store, argparse.Namespace], Awaitable[int]],
         args: argparse.Namespace) -> int:
    async def go() -> int:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            return await command(store, args)
        finally:
            await store.close()

    return asyncio.run(go())


async def _list(store: Store, args: argparse.Namespace) -> int:
    inv = await inventory(store, args.job)
    print(inv.to_json() if args.json else format_inventory(inv))
    return 0


async def _verify(store: Store, args: argparse.Namespace) -> int:
    problems = await verify(store, args.job)
    for p in problems:
        print(p)
    if problems:
        print(f"jobmesh agent verify: {len(problems)} bad object(s) in job {args.job}",
              file=sys.stderr)
        return 1
    print(f"job {args.job}: every object verified")
    return 0


async def _prune(store: Store, args: argparse.Namespace) -> int:
    deleted = await prune(store, args.job, args.keep, dry_run=args.dry_run)
    for key in deleted:
        print(key)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(deleted)} object(s)", file=sys.stderr)
    return 0
