"""Export and import over the API: a job's logical dump out, a dump in as a new job.

Export wakes the job if it is paused, has the job's agent take a dump into
the store (``POST /dump`` answers the dump's manifest once it is stored), then
streams the stored object to the client with its length and sha256, so the
client can verify what it got. Nothing is held in memory.

Import streams the request body into ``<state-dir>/imports/<id>.pgdump``
(readable by the postgres OS user, which loads it) and creates the job with
that file as its source; the backend loads it when it creates the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from pathlib import Path

import aiohttp
from aiohttp import web

from jobmesh.agent.apitoken import header, job_token
from jobmesh.agent.manifest import Manifest, ManifestError, job_prefix
from jobmesh.agent.store import CHUNK, Digest, Store, StoreError

from ..catalog.db import Catalog
from ..catalog.models import Conflict, Job, NotFound
from ..catalog.states import DesiredState, JobState
from .request import ApiError, timeout_param
from .wait import JobWatch

# Who acts through the API: whoever holds its one bearer token (the CLI, on the mesh's
# machine). Events record it so, with the request's source address.
API_ACTOR = "api"

log = logging.getLogger("jobmesh.controller.api")

DUMP_MAGIC = b"PGDMP"  # pg_dump's custom format
AGENT_CONNECT_TIMEOUT = 10.0
ATTEMPTS = 3  # a job paused between the wake and the dump is woken again


# --- export -------------------------------------------------------------------------------


async def export_job(req: web.Request, job: Job, *, catalog: Catalog, store: Store,
                     http: aiohttp.ClientSession, watch: JobWatch,
                     agent_key: bytes) -> web.StreamResponse:
    manifest = await _dump(job, catalog, http, watch, timeout_param(req), agent_key)
    if not manifest.objects:
        raise ApiError(502, f"the dump of job {job.id} lists no object",
                       "retry; if it persists, see the agent's log")
    entry = manifest.objects[0]
    key = f"{job_prefix(job.id)}{entry.key}"
    if await store.size(key) != entry.size:  # while a clean error can still be sent
        raise ApiError(502, f"dump {manifest.id} of job {job.id} is missing or damaged in "
                            f"{store.url}", "retry the export; the agent takes a new dump")
    resp = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{job.id}.pgdump"',
        "X-Jobmesh-Dump-Id": manifest.id,
        "X-Jobmesh-Sha256": entry.sha256,
    })
    resp.content_length = entry.size
    await resp.prepare(req)
    digest = Digest()
    try:
        async with contextlib.aclosing(store.get(key)) as chunks:
            async for chunk in chunks:
                digest.update(chunk)
                await resp.write(chunk)
        if (digest.size, digest.hexdigest()) != (entry.size, entry.sha256):
            raise StoreError(f"{key} does not match its manifest ({digest.size} bytes, "
                             f"expected {entry.size})")
    except (StoreError, ConnectionError) as exc:
        # The status line is gone: all we can do is cut the response short, which the
        # client sees as fewer bytes than Content-Length (or a sha256 mismatch).
        log.error("export of job %s (dump %s) broke off: %s", job.id, manifest.id, exc)
        if req.transport is not None:
            req.transport.close()
        return resp
    await resp.write_eof()
    try:
        await catalog.add_event(job.id, "exported", bytes_moved=entry.size, actor=API_ACTOR,
                                detail={"dump": manifest.id, "sha256": entry.sha256,
                                        "source": req.remote or "unknown"})
    except Exception as exc:  # the export itself succeeded; the answer is already sent
        log.warning("cannot record the export of job %s: %s", job.id, exc)
    return resp


async def _dump(job: Job, catalog: Catalog, http: aiohttp.ClientSession, watch: JobWatch,
                timeout: float, agent_key: bytes) -> Manifest:
    """A fresh dump of the job, by its agent, waking the job first if needed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for attempt in range(ATTEMPTS):
        if job.desired_state == DesiredState.ENDED and job.state != JobState.RUNNING:
            raise ApiError(409, f"job {job.id} is ended",
                           f"resume it first (`jobmesh job resume {job.id}`), then export")
        if job.state != JobState.RUNNING:
            await catalog.request_wake(job.id)
            woken = await watch.wait(job.id, DesiredState.RUNNING,
                                     max(deadline - loop.time(), 0.001))
            assert woken is not None
            job = woken
        await catalog.touch([job.id])  # an export is a use: the idle reaper should wait
        if not job.agent_url:
            raise ApiError(409, f"job {job.id} has no agent to take a dump",
                           "the backend runs jobs without an agent; export is not available")
        status, body = await _post_dump(job, http, agent_key)
        if status == 409 and attempt + 1 < ATTEMPTS:  # paused between our wake and the dump
            again = await catalog.job(job.id)
            if again is None:
                raise NotFound(f"no job {job.id}")
            job = again
            continue
        if status != 200:
            raise ApiError(502, f"the agent of job {job.id} could not dump it: "
                                f"{_agent_error(body)}",
                           "retry; if it persists, see the agent's log")
        try:
            return Manifest.from_json(body)
        except ManifestError as exc:
            raise ApiError(502, f"the agent of job {job.id} answered no dump manifest: {exc}",
                           "the agent and the controller may be different versions") from None
    raise ApiError(409, f"job {job.id} kept pausing while waiting for its dump",
                   "something pauses it right after each wake; `jobmesh job show` tells what")


async def _post_dump(job: Job, http: aiohttp.ClientSession,
                     agent_key: bytes) -> tuple[int, bytes]:
    url = f"{(job.agent_url or '').rstrip('/')}/dump"
    try:
        async with http.post(url, headers=header(job_token(agent_key, job.id)),
                             timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=AGENT_CONNECT_TIMEOUT)) as resp:
            return resp.status, await resp.read()
    except aiohttp.ClientError as exc:
        raise ApiError(502, f"cannot reach the agent of job {job.id} at {url}: {exc}",
                       "if the job died, the controller recovers it; retry in a moment") from None


def _agent_error(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(body)["error"])
    return body.decode("utf-8", "replace").strip()[:200] or "no reason given"


# --- import -------------------------------------------------------------------------------


async def import_job(req: web.Request, job_id: str, *, catalog: Catalog, state_dir: Path,
                     importing: set[str]) -> Job:
    """Receive the dump, then create the job from it (its id must be new)."""
    if job_id in importing or await catalog.job(job_id) is not None:
        raise Conflict(f"job {job_id} already exists" if job_id not in importing
                       else f"job {job_id} is being imported right now")
    importing.add(job_id)
    try:
        imports = state_dir / "imports"
        path = imports / f"{job_id}.pgdump"
        await asyncio.to_thread(_prepare_dir, imports)
        tmp = imports / f".{job_id}.{secrets.token_hex(4)}.partial"
        try:
            size = await _receive(req, tmp)
            await asyncio.to_thread(os.replace, tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        try:
            job = await catalog.create_job(job_id, {"source": {"dump": str(path)}},
                                           actor=API_ACTOR)
        except Conflict:
            path.unlink(missing_ok=True)
            raise
        log.info("job %s: imported a %d-byte dump into %s", job_id, size, path)
        return job
    finally:
        importing.discard(job_id)


def _prepare_dir(path: Path) -> None:
    """The postgres OS user loads the file: the directory must be traversable for it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


async def _receive(req: web.Request, tmp: Path) -> int:
    fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever our umask
        size, buf, checked = 0, bytearray(), False
        async for chunk in req.content.iter_chunked(CHUNK):
            buf += chunk
            size += len(chunk)
            if not checked and len(buf) >= len(DUMP_MAGIC):
                _check_magic(bytes(buf[:len(DUMP_MAGIC)]))
                checked = True
            if len(buf) >= CHUNK:
                await asyncio.to_thread(_write_all, fd, bytes(buf))
                buf.clear()
        if not checked:
            _check_magic(bytes(buf))
        await asyncio.to_thread(_write_all, fd, bytes(buf))
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
    return size


def _check_magic(head: bytes) -> None:
    if not head:
        raise ApiError(400, "the request body is empty",
                       "send the dump file (pg_dump -Fc) as the request body")
    if not head.startswith(DUMP_MAGIC):
        raise ApiError(400, "the request body is not a pg_dump custom-format archive",
                       "make one with `pg_dump -Fc` or `jobmesh job export`")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
