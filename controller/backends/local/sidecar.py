"""The local jobs' agents: one agent host process (``jobmesh agent host``) that is them all.

The host runs in its own session, so it outlives a controller restart; its
pid and port are in ``agent-host.json`` under the backend's root, so the
next controller finds it. A pid recorded before a reboot may belong to
anything by now, so "running" also means "its command line is an agent host
with this state file". A job has an agent once the host was told of it
(``PUT /jobs/<id>`` with its settings); its agent URL is
``http://127.0.0.1:<port>/jobs/<id>``. When the host dies, the next health
check of each running job starts a new host and puts the job back. Each job's
agent wants its own token, and the host's endpoints the host's
(``jobmesh.agent.apitoken``, derived from the controller's agent key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from jobmesh.agent.apitoken import header, host_token, job_token
from jobmesh.agent.manifest import Manifest
from jobmesh.agent.postgres import pid_alive
from jobmesh.agent.postmaster import wait_for_exit
from jobmesh.agent.store import Store
from jobmesh.agent.wal import Archiver
from jobmesh.errors import one_line
from jobmesh.secretfile import write_secret_file

from ...core.backend import BackendError, PermanentError, Progress
from ...storage.access import AccessError, StoreAccess
from ..agent_client import CONNECT_TIMEOUT, AgentClient
from .process import JobDir, spool_backlog, stop_postgres

log = logging.getLogger("jobmesh.controller.local")

HOST_START_TIMEOUT = 60.0  # until a new host listens
LISTING_AGE = 1.0
HOST_NICENESS = 10  # s a listing of the host's jobs answers health checks for


@dataclass(frozen=True)
class HostInfo:
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class AgentInfo:
    """A job's agent: the host that runs it, where its API is, and its token."""

    host: HostInfo
    job_id: str
    token: str = field(default="", repr=False)

    @property
    def pid(self) -> int:
        return self.host.pid

    @property
    def url(self) -> str:
        return f"{self.host.url}/jobs/{self.job_id}"


def agent_settings(jd: JobDir, *, base_backup_interval: float, wal_window: float,
                   generation: int) -> dict[str, Any]:
    """What ``PUT /jobs/<id>`` sends: the job's agent settings (the host's ``ServeConfig``
    by field name)."""
    return {"pgdata": str(jd.pgdata), "spool": str(jd.spool),
            "base_backup_interval": base_backup_interval, "wal_window": wal_window,
            "generation": generation,
            "keep_base_backups": 0}  # the controller's retention decides


class AgentHost:
    """The controller's handle on the agent host: starting it, and telling it of jobs."""

    def __init__(self, root: Path, python: str, store_url: str,
                 s3_endpoint: str | None, key: bytes,
                 store_access: StoreAccess | None = None) -> None:
        self.state = root / "agent-host.json"
        self.log_path = root / "agent-host.log"
        self.key = key  # each job's agent token, and the host's own, derive from it
        self.store_access = store_access  # None: the host uses the controller's credentials
        self.token_file = root / "agent-host-token"
        self.argv = [python, "-m", "jobmesh", "agent", "host", "--store", store_url,
                     "--state", str(self.state), "--api-token-file", str(self.token_file)]
        if s3_endpoint:
            self.argv += ["--s3-endpoint", s3_endpoint]
        self._lock = asyncio.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._listing: tuple[float, HostInfo, frozenset[str]] | None = None
        self._puts: set[asyncio.Task[None]] = set()

    def read(self) -> HostInfo | None:
        try:
            raw = json.loads(self.state.read_text())
            return HostInfo(int(raw["pid"]), int(raw["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running(self, info: HostInfo | None = None) -> bool:
        info = info or self.read()
        if info is None or not pid_alive(info.pid):
            return False
        try:
            argv = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return True  # no procfs: trust the pid
        return b"host" in argv and str(self.state).encode() in argv

    async def ensure(self) -> HostInfo:
        """The running host (one started now if there is none)."""
        info = self.read()
        if info is not None and self.running(info):
            return info
        async with self._lock:
            info = self.read()
            if info is not None and self.running(info):
                return info
            if info is not None:  # the port it had: the agent URLs in the catalog stay right
                with contextlib.suppress(BackendError):
                    return await self._spawn(info.port)
            return await self._spawn(0)

    async def _spawn(self, port: int) -> HostInfo:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.store_access is not None:  # a key of its own, which cannot delete
            try:
                s3 = await self.store_access.issue(None)
            except AccessError as exc:
                raise (PermanentError if exc.permanent else BackendError)(str(exc)) from exc
            env |= {"AWS_ACCESS_KEY_ID": s3.access_key_id,
                    "AWS_SECRET_ACCESS_KEY": s3.secret_access_key}
            env.pop("AWS_SESSION_TOKEN", None)
        proc = await asyncio.to_thread(self._popen, port, env)
        self.reap()
        self._child = proc
        deadline = time.monotonic() + HOST_START_TIMEOUT
        while (info := self.read()) is None or info.pid != proc.pid:
            if proc.poll() is not None:
                raise BackendError(f"the agent host exited at start: {last_line(self.log_path)}")
            if time.monotonic() > deadline:
                proc.kill()
                raise BackendError(f"the agent host did not listen within "
                                   f"{HOST_START_TIMEOUT:g} s")
            await asyncio.sleep(0.02)
        log.info("agent host started (pid %d, port %d)", info.pid, info.port)
        return info

    def _popen(self, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            self.state.unlink()
        write_secret_file(self.token_file, host_token(self.key))
        with self.log_path.open("ab") as out:
            # Niced: its work (shipping WAL, snapshots, base backups) is background work,
            # and gives way to the jobs' own PostgreSQL and to their starts.
            return subprocess.Popen(["nice", "-n", str(HOST_NICENESS), *self.argv,
                                     "--listen", f"127.0.0.1:{port}"],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True, env=env)

    async def jobs(self) -> frozenset[str] | None:
        """The jobs the host runs an agent for (a listing at most a second old); None when
        no host runs."""
        info = self.read()
        if info is None or not self.running(info):
            return None
        cached = self._listing
        if cached is not None and cached[1] == info and time.monotonic() - cached[0] < LISTING_AGE:
            return cached[2]
        status, body = await self._call(info, "GET", "/jobs", 10)
        if status != 200 or not isinstance(body, dict):
            raise BackendError(f"the agent host could not list its jobs: {_error(body)}")
        listed = frozenset(str(j["job"]) for j in body["jobs"])
        self._listing = (time.monotonic(), info, listed)
        return listed

    async def agent(self, job_id: str) -> AgentInfo | None:
        """The job's agent, if the host runs one."""
        listed = await self.jobs()
        info = self.read()
        if listed is None or info is None or job_id not in listed:
            return None
        return AgentInfo(info, job_id, job_token(self.key, job_id))

    async def put(self, job_id: str, settings: dict[str, Any]) -> AgentInfo:
        """Start the job's agent (a no-op when it runs with these settings already)."""
        info = await self.ensure()
        token = job_token(self.key, job_id)
        status, body = await self._call(info, "PUT", f"/jobs/{job_id}", 60,
                                        {**settings, "api_token": token})
        if status not in (200, 201):
            raise BackendError(f"cannot start the agent of job {job_id}: {_error(body)}")
        self._listing = None
        return AgentInfo(info, job_id, token)

    async def put_soon(self, job_id: str, settings: dict[str, Any]) -> AgentInfo:
        """Start the job's agent without waiting for it: a job serves its clients before
        its agent runs (its WAL waits in the spool), and a busy host answers a start in
        seconds, which a wake would otherwise wait for. A failure is logged; the next
        health check of the job puts it again."""
        info = await self.ensure()

        async def put() -> None:
            try:
                await self.put(job_id, settings)
            except Exception as exc:
                log.warning("job %s: %s", job_id, one_line(exc))

        task = asyncio.create_task(put(), name=f"agent-{job_id}")
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)
        return AgentInfo(info, job_id, job_token(self.key, job_id))

    async def remove(self, job_id: str, timeout: float) -> None:
        """Stop the job's agent: it ships what is left in its spool first (the host goes
        on with that past ``timeout``; the caller does not wait longer)."""
        for task in [t for t in self._puts if t.get_name() == f"agent-{job_id}"]:
            with contextlib.suppress(Exception):
                await task  # a start still on its way: stopped after it
        info = self.read()
        if info is None or not self.running(info):
            return
        self._listing = None
        try:
            status, body = await self._call(info, "DELETE", f"/jobs/{job_id}", timeout)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("job %s: its agent did not stop within %g s (%s)", job_id, timeout,
                        one_line(exc) or type(exc).__name__)
            return
        if status == 200 and isinstance(body, dict) and body.get("status"):
            log.warning("job %s: its agent stopped with status %s", job_id, body["status"])

    async def stop(self, timeout: float = 60) -> None:
        """Stop the host (every job's agent ships what it has left)."""
        info = self.read()
        if info is None or not self.running(info):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, 15)
        try:
            await wait_for_exit(info.pid, timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, 9)
        self.reap()

    def starting(self, job_id: str) -> bool:
        """Is a start of the job's agent on its way (``put_soon``)?"""
        return any(t.get_name() == f"agent-{job_id}" for t in self._puts)

    async def settle(self) -> None:
        """Until the starts ``put_soon`` sent have been answered."""
        if self._puts:
            await asyncio.gather(*list(self._puts), return_exceptions=True)

    def reap(self) -> None:
        """Collect a host of ours that exited (it would stay a zombie until then)."""
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    async def _call(self, info: HostInfo, method: str, path: str, timeout: float,
                    body: Any = None) -> tuple[int, Any]:
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=limits) as session, \
                session.request(method, info.url + path, json=body,
                                headers=header(host_token(self.key))) as resp:
            return resp.status, await resp.json(content_type=None)


def _error(body: Any) -> Any:
    return body.get("error") if isinstance(body, dict) else body


async def request_pause(info: AgentInfo, timeout: float) -> Manifest:
    """The agent stops Postgres, drains the spool and stores a pause snapshot; returns the
    snapshot's manifest, as stored (see ``agent_client``)."""
    return await AgentClient(info.url, info.job_id, info.token).pause(timeout)


async def ship_last_wal(jd: JobDir, host: AgentHost, store: Store, report: Progress, *,
                        timeout: float) -> None:
    """Before a crashed job's local data is discarded: let its agent upload the finished
    WAL still in the spool (or, if it has none, do it here), then stop what is left. What
    is not in the store by then is lost."""
    if await host.agent(jd.job_id) is not None:
        if await asyncio.to_thread(spool_backlog, jd):
            await report("shipping the last WAL")
        for _ in range(int(timeout / 0.1)):  # the agent ships segments as they appear
            if not await asyncio.to_thread(spool_backlog, jd):
                break
            await asyncio.sleep(0.1)
        await host.remove(jd.job_id, timeout)  # its final drain takes stragglers
    await stop_postgres(jd, "immediate")
    if await asyncio.to_thread(spool_backlog, jd):
        try:
            await asyncio.wait_for(Archiver(store, jd.job_id, jd.spool).drain(), timeout)
        except Exception as exc:
            log.error("job %s: cannot ship its spooled WAL: %s", jd.job_id, one_line(exc))


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for an error message."""
    try:
        with path.open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 4096, 0))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return f"no log at {path}"
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else f"nothing in {path}"
