"""What a job has in the store: one listing of its prefix, read through its manifests.

Only manifests make objects count: ``list`` shows snapshots and dumps that
have one, and everything else under ``snapshots/`` and ``dumps/`` is an
"orphaned object" (an upload that died, or one still in progress). WAL
segments have no manifests; they count by name. The content-addressed
objects of format 2 snapshots are store-wide (``_objects/``), shared
between jobs: which of them are orphans only a collection over every
job's manifests can say (``jobmesh store gc``).

``verify`` (re-download and check) and ``prune`` (delete what no kept
snapshot needs) work from the same ``Listing``, in their own modules.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Iterable
from dataclasses import asdict, dataclass, field

from .manifest import (
    Manifest,
    ManifestError,
    dump_ids_with_manifest,
    dump_manifest_key,
    job_prefix,
    snapshot_ids_with_manifest,
    snapshot_manifest_key,
)
from .store import NotFound, ObjectInfo, Store, get_bytes
from .walnames import is_segment, parse_segment

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
class Listing:
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


async def read_listing(store: Store, job: str) -> Listing:
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
    sman = await gather_bounded([read(snapshot_manifest_key(job, s)) for s in sids])
    dman = await gather_bounded([read(dump_manifest_key(job, d)) for d in dids])
    wal_prefix = f"{job_prefix(job)}wal/"
    wal = [o for k, o in objects.items()
           if k.startswith(wal_prefix) and is_segment(wal_name(k))]
    return Listing(
        job, objects,
        {s: m for s, m in zip(sids, sman, strict=True) if m is not None},
        {d: m for d, m in zip(dids, dman, strict=True) if m is not None},
        wal, sorted(unreadable))


def wal_name(key: str) -> str:
    """``job/wal/00000001/000000010000000000000003.zst`` -> the segment name."""
    name = key.rsplit("/", 1)[-1]
    return name[:-len(".zst")] if name.endswith(".zst") else name


async def gather_bounded(aws: Iterable[Awaitable[object]], limit: int = PARALLEL) -> list:
    slots = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[object]) -> object:
        async with slots:
            return await aw

    return await asyncio.gather(*(one(a) for a in aws))


def _stored_size(man: Manifest) -> int:
    return man.stored_size


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
    listing = await read_listing(store, job)
    inv = Inventory(job=job, store=store.url, unreadable=listing.unreadable)
    for sid, m in listing.snapshots.items():
        inv.snapshots.append(SnapshotInfo(
            sid, m.kind, _stored_size(m), m.created_at, m.timeline, m.start_lsn, m.end_lsn,
            m.start_wal, m.end_wal, m.pg_version))
    for did, m in listing.dumps.items():
        inv.dumps.append(DumpInfo(did, _stored_size(m), m.created_at, m.pg_version))
    inv.wal = wal_ranges((wal_name(o.key), o.size) for o in listing.wal)
    inv.orphaned = [info for _, _, info in listing.orphans()]
    return inv

