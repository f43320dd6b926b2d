"""Where a new or resumed job's PGDATA comes from, besides the template and the warm cache:
a fork of another job, a dump to load, and the files a delta restore starts from."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from jobmesh.agent.errors import AgentError
from jobmesh.agent.manifest import Manifest
from jobmesh.agent.restore import restore
from jobmesh.agent.store import Store, StoreError
from jobmesh.errors import one_line

from ...catalog.models import Job
from ...core.backend import PermanentError, Progress, Started
from ..job_store import snapshot_to_restore
from ..step_report import Laps, Relay
from .instance import HOST, Instances
from .process import JobDir, prepare
from .template import Template

log = logging.getLogger("jobmesh.controller.local")


def fork_source(job: Job) -> tuple[str, str | None] | None:
    """(source job, time or None) for a fork (``{"fork": SRC, "at": TIME}``)."""
    source = job.spec.get("source")
    if isinstance(source, dict) and isinstance(source.get("fork"), str):
        at = source.get("at")
        return source["fork"], at if isinstance(at, str) else None
    return None


def dump_source(job: Job) -> Path | None:
    source = job.spec.get("source")
    if source is None or fork_source(job) is not None:
        return None
    if isinstance(source, dict) and set(source) == {"dump"} and isinstance(source["dump"], str):
        return Path(source["dump"])
    raise PermanentError(f'cannot create job {job.id}: unsupported job source {source!r} '
                         '(the local backend loads {"dump": "/path/to/file.pgdump"} and forks '
                         '{"fork": "<job id>", "at": "<time>"})')


async def delta_base(template: Template, jd: JobDir, manifest: Manifest) -> str:
    """What PGDATA holds before a restore fetches the rest: a stale warm copy of the job
    (the warm cache left it there), else a copy of the template (most of a small job's
    files), else nothing."""
    if await asyncio.to_thread(jd.pgdata.exists):
        return "stale copy"
    if not manifest.chunked:
        return "none"
    try:
        await template.ensure()
        if template.manifest is None or template.manifest.pg_version != manifest.pg_version:
            return "none"
        return f"template {await template.take(jd.pgdata)}"
    except (OSError, StoreError) as exc:
        log.warning("no template copy to restore over (%s): restoring it all", exc)
        await asyncio.to_thread(shutil.rmtree, jd.pgdata, True)
        return "none"


async def fork(job: Job, jd: JobDir, progress: Progress, laps: Laps, source: str,
               at: str | None, *, store: Store, s3_endpoint: str | None, template: Template,
               instances: Instances) -> Started:
    """Create ``job`` from ``source``'s snapshots (and WAL, replayed to ``at`` or to its
    end), only reading the source's part of the store: no claim on its generation, and
    its objects shared, not copied."""
    manifest = await snapshot_to_restore(store, source)  # none: PermanentError
    await progress(f"restoring {source}" + (f" as of {at}" if at else ""))
    await asyncio.to_thread(prepare, jd)
    base = await delta_base(template, jd, manifest)
    relay = Relay(progress, "restoring", manifest.uncompressed_size)
    try:
        result = await restore(jd.pgdata, store, source, target_time=at,
                               s3_endpoint=s3_endpoint, progress=relay, delta=True)
    except AgentError as exc:
        raise PermanentError(f"cannot fork job {source}: {one_line(exc)}") from exc
    await relay.flush()
    laps("restore")
    port, info = await instances.start(job, jd, progress, "create",
                                       recovery=result.recovery_configured, laps=laps,
                                       database=f"job_{source}")
    log.info("forked job %s from %s (%s snapshot %s%s) in %.0f ms (%s)", job.id, source,
             result.manifest.kind, result.manifest.id, f", to {at}" if at else "",
             laps.total(), laps)
    return Started(HOST, port, info.url, bytes_moved=result.bytes_restored,
                   detail={"fork": source, "at": at, "base": base,
                           "snapshot": result.manifest.id,
                           "wal_replayed": result.recovery_configured,
                           "timings_ms": laps.laps})
