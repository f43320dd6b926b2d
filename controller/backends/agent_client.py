"""The controller's client for a job's agent: pause, base backup, status over its HTTP API.

Both backends ask their jobs' agents through it: the local one at
``127.0.0.1:<port>``, the Kubernetes one at the pod's IP. The controller
never imports the sidecar daemon (an import contract says so); this is the
whole of what it says to one.

An answer is checked here. A snapshot comes back as a ``Manifest`` read by
the agent's own parser, so what the backends hand the reconciler is the
manifest as the agent stored it; a refusal (or anything else that is not the
snapshot asked for) is a ``BackendError`` that quotes the agent. A request
that gets no answer raises what it raised: ``aiohttp.ClientError``,
``TimeoutError``, or ``ValueError`` for a body that is not JSON. Each backend
words those in its own way (the local backend's step wrapper, the Kubernetes
backend's "cannot ask the agent ...").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from jobmesh.agent.apitoken import header
from jobmesh.agent.manifest import Manifest, ManifestError

from ..core.backend import BackendError

CONNECT_TIMEOUT = 10.0  # to reach the agent; the rest of a request is the operation's
STATUS_TIMEOUT = 10.0   # a status is quick: the agent reads files and asks Postgres


@dataclass(frozen=True)
class SnapshotSummary:
    """A snapshot as the agent's status names it."""

    id: str
    kind: str
    created_at: str
    size: int


@dataclass(frozen=True)
class AgentStatus:
    """What ``GET /status`` says of the job's WAL shipping and recovery points."""

    postgres_running: bool
    paused: bool
    pausing: bool
    last_archived: str | None    # the WAL segment PostgreSQL archived last
    spool_backlog: int           # finished segments not yet in the store
    last_snapshot: SnapshotSummary | None      # pause or base: the latest recovery point
    last_base_backup: SnapshotSummary | None
    base_backup_running: bool
    next_base_backup_in: float | None          # None: no scheduled base backups


class AgentClient:
    """One job's agent, at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, job_id: str, token: str | None) -> None:
        """``token``: the agent's (``jobmesh.agent.apitoken.job_token``)."""
        self.url = url.rstrip("/")
        self.job_id = job_id
        self._headers = header(token) if token else {}

    async def pause(self, timeout: float) -> Manifest:
        """POST /pause: the agent stops Postgres, drains the spool and stores a pause
        snapshot; returns the snapshot's manifest, as stored."""
        return await self._snapshot("/pause", timeout, kind="pause", doing="pause",
                                    asked="the pause", wanted="a pause snapshot's manifest")

    async def base_backup(self, timeout: float) -> Manifest:
        """POST /base-backup: a recovery point of the running job (the one being taken,
        when one is); returns its manifest, as stored."""
        return await self._snapshot("/base-backup", timeout, kind="base",
                                    doing="take a base backup", asked="the base backup",
                                    wanted="a base backup's manifest")

    async def status(self, timeout: float = STATUS_TIMEOUT) -> AgentStatus:
        """GET /status."""
        status, _, body = await self._call("GET", "/status", timeout)
        if status != 200 or not isinstance(body, dict):
            raise BackendError(f"the agent of job {self.job_id} could not tell its status: "
                               f"{_error(body)}")
        try:
            return _status(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"the agent of job {self.job_id} answered its status with "
                               f"something unreadable ({type(exc).__name__}: {exc})") from None

    async def _snapshot(self, path: str, timeout: float, *, kind: str, doing: str, asked: str,
                        wanted: str) -> Manifest:
        status, data, body = await self._call("POST", path, timeout)
        if status != 200 or not isinstance(body, dict):
            raise BackendError(f"the agent of job {self.job_id} could not {doing}: "
                               f"{_error(body)}")
        try:
            manifest = Manifest.from_json(data)
        except ManifestError:
            manifest = None
        if manifest is None or manifest.kind != kind or not manifest.id:
            raise BackendError(f"the agent of job {self.job_id} answered {asked} with "
                               f"something other than {wanted}")
        return manifest

    async def _call(self, method: str, path: str, timeout: float) -> tuple[int, bytes, Any]:
        """The answer's status, body and the body as JSON (None when empty)."""
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=limits) as session, \
                session.request(method, self.url + path, headers=self._headers) as resp:
            data = await resp.read()
            return resp.status, data, await resp.json(content_type=None)


def _error(body: Any) -> Any:
    """What a refusal says: its ``error``, or the whole body when it is not an object."""
    return body.get("error") if isinstance(body, dict) else body


def _status(body: dict[str, Any]) -> AgentStatus:
    wal = body["wal"]
    return AgentStatus(
        postgres_running=bool(body["postgres"]["running"]), paused=bool(body["paused"]),
        pausing=bool(body["pausing"]), last_archived=wal["last_archived"],
        spool_backlog=int(wal["spool_backlog"]),
        last_snapshot=_summary(body["last_snapshot"]),
        last_base_backup=_summary(body["last_base_backup"]),
        base_backup_running=bool(body["base_backup_running"]),
        next_base_backup_in=(None if body["next_base_backup_in"] is None
                             else float(body["next_base_backup_in"])))


def _summary(raw: dict[str, Any] | None) -> SnapshotSummary | None:
    if raw is None:
        return None
    return SnapshotSummary(str(raw["id"]), str(raw["kind"]), str(raw["created_at"]),
                           int(raw["size"]))
