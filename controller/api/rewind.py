"""``POST /v1/jobs/{id}/restore``: rewind a job to a time within its point-in-time window.

The job is paused first, so its current state is a pause snapshot; that
snapshot is pinned in the store for the job's point-in-time window (from
then on retention keeps it, as the state the rewind replaced: restore it by
id to get it back). Then the job's spec gets ``rewind: {at, id}`` and the job
is resumed: the backend's resume replays the job's base backup and WAL to
``at`` (a new timeline), and marks the rewind done in the store
(``<job>/rewinds/<id>``), so a later resume is an ordinary one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from jobmesh.agent.errors import AgentError
from jobmesh.agent.inventory import read_listing
from jobmesh.agent.manifest import pin_key
from jobmesh.agent.restore import backup_end_time, parse_target_time
from jobmesh.agent.store import Store, put_bytes

from ..catalog.db import Catalog
from ..catalog.models import Job
from ..catalog.states import DesiredState, JobState
from ..storage.retention import PITR_WINDOW
from .request import ApiError, fields, json_object


async def check_target(store: Store, job: Job, text: object) -> datetime:
    """The time to rewind (or fork) to, once the store can reach it: a snapshot of the job
    (base backup or pause) is of before it."""
    try:
        at = parse_target_time(str(text))
    except AgentError as exc:
        raise ApiError(400, f"'at' is not a time: {text!r}",
                       "ISO 8601, e.g. 2026-12-01T10:00:00Z (UTC without an offset)") from exc
    if at > datetime.now(UTC):
        raise ApiError(400, f"{at.isoformat()} is in the future", "rewind to a past time")
    listing = await read_listing(store, job.id)
    ends = sorted(backup_end_time(m) for m in listing.snapshots.values())
    if not ends or ends[0] >= at:
        oldest = ends[0].isoformat() if ends else None
        raise ApiError(409, f"job {job.id} has no snapshot taken before {at.isoformat()}",
                       f"the earliest reachable time is {oldest}" if oldest else
                       "it has no snapshot yet: its first base backup is taken when it starts")
    return at


Settle = Callable[[str, DesiredState, float | None], Awaitable[Job | None]]


async def rewind(req: web.Request, job: Job, *, catalog: Catalog, store: Store,
                 settle: Settle, timeout: float | None) -> Job:
    example = '{"at": "2026-12-01T10:00:00Z"}'
    body = await json_object(req, example)
    fields(body, example, ("at",))
    at = await check_target(store, job, body["at"])
    wait = timeout if timeout is not None else 300.0
    await catalog.set_desired(job.id, DesiredState.PAUSED)
    paused = await settle(job.id, DesiredState.PAUSED, wait)
    if paused is None or paused.state != JobState.PAUSED:
        raise ApiError(409, f"job {job.id} did not pause (state {getattr(paused, 'state', None)})",
                       "a rewind pauses the job first; see `jobmesh job show`")
    listing = await read_listing(store, job.id)
    pauses = [sid for sid, m in listing.snapshots.items() if m.kind == "pause"]
    window = float(job.spec.get("pitr_window", PITR_WINDOW))
    if pauses:
        await put_bytes(store, pin_key(job.id, pauses[-1], time.time() + window),
                        f"replaced by a rewind to {at.isoformat()}\n".encode())
    rid = f"{int(time.time())}-{secrets.token_hex(3)}"
    await catalog.set_spec_field(job.id, "rewind", {"at": at.isoformat(), "id": rid})
    await catalog.set_desired(job.id, DesiredState.RUNNING)
    done = await settle(job.id, DesiredState.RUNNING, wait)
    return done or job
