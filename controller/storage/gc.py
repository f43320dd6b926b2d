"""Garbage collection: retention first, then every object no manifest references.

Objects are shared store-wide (the template, forks, identical files of
different jobs), so what is garbage is decided over every manifest in the
store, including those of jobs the catalog no longer knows and of the
templates. A collection:

1. applies each job's retention (``retention.py``): the manifests of the
   snapshots it lets go are deleted first (from then on they do not exist),
   then their own objects under the job's prefix, the WAL no kept snapshot
   can replay, and the job's orphaned objects older than its newest
   manifest;
2. lists the content-addressed objects and reads every manifest (each one
   once: manifests never change, so the collector remembers what they
   reference); an unreadable manifest stops the collection, since its
   objects cannot be told from garbage;
3. takes the collector's lock, which waits for writers in flight to end
   (``agent.cas.leases``), re-reads the manifests written meanwhile, and
   deletes what is still unreferenced;
4. removes incomplete uploads (``.partial`` files, unfinished S3 multipart
   uploads) older than a grace period: nothing finishes those;
5. deletes what writers leave for it, since they may not delete (README,
   "Scoped store access"): released and expired leases (``leases.sweep``),
   and streamed WAL deltas of segments the archive has since stored whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from jobmesh.agent.cas.leases import CollectorLock, sweep
from jobmesh.agent.cas.objects import name_of_key
from jobmesh.agent.inventory import read_listing
from jobmesh.agent.manifest import Manifest, ManifestError, pin_key, pins
from jobmesh.agent.prune import drop_by_retention
from jobmesh.agent.store import NotFound, ObjectInfo, Store, get_bytes
from jobmesh.agent.store.incomplete import abort_incomplete

from .retention import Retention, kept

log = logging.getLogger("jobmesh.controller.gc")

BATCH = 1000  # keys per DeleteObjects
GRACE = 3600.0  # seconds before an incomplete upload counts as abandoned
# How long the collector holds its lock waiting for writers in flight to finish: writers
# that start meanwhile wait for it, so it stays short (a pause is done in about a second);
# a long base backup, or a lease a killed writer left, makes the collection wait for the
# next one instead.
LOCK_WAIT = 5.0


@dataclass
class GcReport:
    jobs: int = 0
    objects: int = 0  # content-addressed objects found
    referenced: int = 0
    dropped_snapshots: list[str] = field(default_factory=list)  # "<job>/<id>"
    deleted_keys: int = 0  # job-prefix keys retention deleted (manifests, WAL, orphans)
    deleted_objects: int = 0
    deleted_bytes: int = 0
    incomplete: int = 0  # abandoned partial uploads removed
    deferred: str = ""  # why nothing was collected, if so
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Collector:
    """One store's collector; remembers what each (immutable) manifest references."""

    def __init__(self, store: Store, *, grace: float = GRACE, lock_wait: float = LOCK_WAIT):
        self.store = store
        self.grace = grace
        self.lock_wait = lock_wait
        self.refs: dict[str, frozenset[str]] = {}
        self._running = asyncio.Lock()

    async def collect(self, policies: Mapping[str, Retention], *, default: Retention,
                      only: list[str] | None = None, dry_run: bool = False,
                      now: datetime | None = None) -> GcReport:
        """Apply retention to the jobs ``only`` names (else to every job with snapshots in
        the store), each with its policy from ``policies`` or ``default``, then collect
        every unreferenced object."""
        async with self._running:
            return await self._collect(policies, default, only, dry_run,
                                       now or datetime.now(UTC))

    async def _collect(self, policies: Mapping[str, Retention], default: Retention,
                       only: list[str] | None, dry_run: bool, now: datetime) -> GcReport:
        report = GcReport(dry_run=dry_run)
        everything = await self.store.list("")
        jobs = sorted({k.key.split("/", 1)[0] for k in everything
                       if "/snapshots/" in k.key and not k.key.startswith("_")})
        gone: set[str] = set()
        for job in jobs if only is None else sorted(set(only)):
            if job.startswith("TEMPLATE-"):
                continue  # the template's snapshot is named by template.json, kept
            report.jobs += 1
            gone |= await self._retain(job, policies.get(job, default), now, dry_run, report)
        everything = [o for o in everything if o.key not in gone]
        objects = {n: o for o in everything if (n := name_of_key(o.key)) is not None}
        report.objects = len(objects)
        referenced, unreadable = await self.references(everything)
        if unreadable:
            report.deferred = (f"{len(unreadable)} manifests cannot be read ({unreadable[0]}): "
                               "their objects cannot be told from garbage")
            return report
        report.referenced = len(referenced & objects.keys())
        garbage = sorted(objects.keys() - referenced)
        if garbage and not dry_run:
            await self._delete_garbage(garbage, objects, report)
        elif dry_run:
            report.deleted_objects = len(garbage)
            report.deleted_bytes = sum(objects[n].size for n in garbage)
        report.incomplete = await abort_incomplete(self.store, older_than=self.grace,
                                                   dry_run=dry_run)
        if not dry_run:  # writers never delete: their released and expired leases go here
            report.deleted_keys += len(await sweep(self.store))
        return report

    async def _retain(self, job: str, policy: Retention, now: datetime, dry_run: bool,
                      report: GcReport) -> set[str]:
        """Apply the job's retention; returns the keys deleted (or, dry, to delete)."""
        listing = await read_listing(self.store, job)
        if listing.unreadable:
            log.warning("job %s: %d unreadable manifests; its retention waits",
                        job, len(listing.unreadable))
            return set()
        pinned = pins(list(listing.objects), job)
        keep = kept(listing.snapshots, policy, now, pinned)
        dropped = [sid for sid in listing.snapshots if sid not in keep]
        deleted = await drop_by_retention(self.store, job, listing, keep, dry_run=dry_run)
        report.dropped_snapshots += [f"{job}/{sid}" for sid in dropped]
        expired = [pin_key(job, sid, until) for sid, until in pinned.items()
                   if until <= now.timestamp()]
        expired = [k for k in expired if k in listing.objects]
        if expired and not dry_run:
            await self.store.delete_many(expired)
        deleted += expired
        report.deleted_keys += len(deleted)
        return set(deleted)

    async def references(self, everything: list[ObjectInfo]) -> tuple[set[str], list[str]]:
        """Every object name a manifest references, and the manifests that cannot be read."""
        keys = [o.key for o in everything if _is_manifest(o.key)]
        unreadable: list[str] = []
        slots = asyncio.Semaphore(16)

        async def read(key: str) -> None:
            if key in self.refs:
                return
            async with slots:
                try:
                    m = Manifest.from_json(await get_bytes(self.store, key))
                except NotFound:
                    return  # dropped meanwhile
                except ManifestError:
                    unreadable.append(key)
                    return
            self.refs[key] = frozenset(m.object_names())

        await asyncio.gather(*(read(k) for k in keys))
        present = set(keys)
        for key in list(self.refs):
            if key not in present:
                del self.refs[key]
        refs: set[str] = set()
        for names in self.refs.values():
            refs |= names
        return refs, sorted(unreadable)

    async def _delete_garbage(self, garbage: list[str], objects: dict[str, ObjectInfo],
                              report: GcReport) -> None:
        lock = CollectorLock(self.store)
        if not await lock.acquire(self.lock_wait):
            report.deferred = (f"writers stayed in flight for {self.lock_wait:.0f} s (or "
                               "another collector runs): nothing deleted, the next "
                               "collection will")
            return
        try:
            # Manifests written since we read them (their writers have finished: we hold
            # the lock) may reference what looked like garbage.
            referenced, unreadable = await self.references(await self.store.list(""))
            if unreadable:
                report.deferred = f"manifest {unreadable[0]} cannot be read"
                return
            doomed = [n for n in garbage if n not in referenced]
            for i in range(0, len(doomed), BATCH):
                if lock.expiring:
                    report.deferred = "the lock's time ran out; the next collection goes on"
                    break
                batch = doomed[i:i + BATCH]
                await self.store.delete_many([objects[n].key for n in batch])
                report.deleted_objects += len(batch)
                report.deleted_bytes += sum(objects[n].size for n in batch)
        finally:
            await lock.release()


@dataclass
class JobUsage:
    """What a job holds in the store, in stored (compressed) bytes."""

    snapshots: int = 0
    unique: int = 0  # objects only this job's snapshots reference
    shared: int = 0  # objects other jobs (the template, forks) reference too
    wal: int = 0
    other: int = 0  # dumps, format 1 archives, claims

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class StoreSurvey:
    """The whole store: its bytes and objects (each counted once), and each job's share."""

    total_bytes: int
    objects: int
    jobs: dict[str, JobUsage]


async def usage(collector: Collector) -> dict[str, JobUsage]:
    """Every job prefix in the store (templates too) and what it holds."""
    return (await survey(collector)).jobs


async def survey(collector: Collector) -> StoreSurvey:
    """What ``usage`` tells, and the store's total, from one listing."""
    everything = await collector.store.list("")
    sizes = {n: o.size for o in everything if (n := name_of_key(o.key)) is not None}
    await collector.references(everything)
    by_job: dict[str, set[str]] = {}
    out: dict[str, JobUsage] = {}
    for key, names in collector.refs.items():
        job = key.split("/", 1)[0]
        by_job.setdefault(job, set()).update(names)
        out.setdefault(job, JobUsage()).snapshots += 1
    holders: dict[str, int] = {}
    for held in by_job.values():
        for n in held:
            holders[n] = holders.get(n, 0) + 1
    for job, held in by_job.items():
        for n in held:
            size = sizes.get(n, 0)
            if holders[n] == 1:
                out[job].unique += size
            else:
                out[job].shared += size
    for o in everything:
        job, _, rest = o.key.partition("/")
        if job.startswith("_") or not rest:
            continue
        u = out.setdefault(job, JobUsage())
        if rest.startswith("wal/"):
            u.wal += o.size
        elif not rest.endswith("/manifest.json"):
            u.other += o.size
    return StoreSurvey(sum(o.size for o in everything), len(everything),
                       dict(sorted(out.items())))


def _is_manifest(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 4 and parts[1] == "snapshots" and parts[3] == "manifest.json" \
        and not key.startswith("_")

