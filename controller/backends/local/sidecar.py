"""A local job's agent (``jobmesh agent serve``): starting it, finding it, asking it, stopping it.

The agent runs in its own session, so it outlives a controller restart; its
pid and port are in ``agent.json`` so the next controller finds it. A pid
recorded before a reboot may belong to anything by now, so "running" also
means "its command line names this job's PGDATA".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from jobmesh.agent.manifest import Manifest
from jobmesh.agent.postgres import free_port, pid_alive
from jobmesh.agent.postmaster import wait_for_exit
from jobmesh.agent.store import Store
from jobmesh.agent.wal import Archiver
from jobmesh.errors import one_line

from ...core.backend import BackendError, Progress
from ..agent_client import AgentClient
from .process import JobDir, spool_backlog, stop_postgres

log = logging.getLogger("jobmesh.controller.local")


@dataclass(frozen=True)
class AgentInfo:
    pid: int
    port: int
    postgres_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def agent_argv(python: str, jd: JobDir, port: int, *, store_url: str, s3_endpoint: str | None,
               base_backup_interval: float, wal_window: float,
               generation: int = 0) -> list[str]:
    argv = [python, "-m", "jobmesh", "agent", "serve", "--pgdata", str(jd.pgdata),
            "--job", jd.job_id, "--store", store_url]
    if s3_endpoint:
        argv += ["--s3-endpoint", s3_endpoint]
    return [*argv, "--listen", f"127.0.0.1:{port}", "--spool", str(jd.spool),
            "--base-backup-interval", f"{base_backup_interval:g}",
            "--wal-window", f"{wal_window:g}", "--generation", str(generation),
            "--keep-base-backups", "0"]  # the controller's retention decides


def pick_port(before: AgentInfo | None) -> int:
    """The port the job's last agent had when it is free (so the agent URL the catalog
    holds stays right), else any free one."""
    if before is not None:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's server
            try:
                s.bind(("127.0.0.1", before.port))
            except OSError:
                pass
            else:
                return before.port
    return free_port()


def read_agent(jd: JobDir) -> AgentInfo | None:
    try:
        raw = json.loads(jd.agent_json.read_text())
        return AgentInfo(int(raw["pid"]), int(raw["port"]), int(raw["postgres_port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def agent_running(jd: JobDir, info: AgentInfo | None) -> bool:
    if info is None or not pid_alive(info.pid):
        return False
    try:
        raw = Path(f"/proc/{info.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs: trust the pid
    if not raw:
        # Mid-exec: Popen returns once the child has started exec, which may be before
        # the kernel has set up its new arguments. (Kernel threads have none either,
        # but no recorded agent pid is one.)
        return True
    argv = raw.split(b"\0")
    return b"serve" in argv and str(jd.pgdata).encode() in argv


def spawn_agent(jd: JobDir, argv: Sequence[str], port: int,
                postgres_port: int) -> tuple[AgentInfo, subprocess.Popen[bytes]]:
    """Start the agent, logging to agent.log, and record it in agent.json. Does not wait
    for it to listen (clients need Postgres, not the agent)."""
    with jd.agent_log.open("ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    info = AgentInfo(proc.pid, port, postgres_port)
    tmp = jd.agent_json.with_name(".agent.json.tmp")
    tmp.write_text(json.dumps({**asdict(info), "started_at": time.time()}) + "\n")
    os.replace(tmp, jd.agent_json)
    return info, proc


async def wait_listening(jd: JobDir, info: AgentInfo, timeout: float = 60) -> None:
    """Until the agent accepts connections (it takes about half a second to start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", info.port), 5)
        except (OSError, TimeoutError):
            if not agent_running(jd, info):
                raise BackendError(f"the agent of job {jd.job_id} exited: "
                                   f"{last_line(jd.agent_log)}") from None
            if time.monotonic() > deadline:
                raise BackendError(f"the agent of job {jd.job_id} did not listen on port "
                                   f"{info.port} within {timeout:g} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def request_pause(jd: JobDir, info: AgentInfo, timeout: float) -> Manifest:
    """The agent stops Postgres, drains the spool and stores a pause snapshot; returns the
    snapshot's manifest, as stored (see ``agent_client``)."""
    return await AgentClient(info.url, jd.job_id).pause(timeout)


async def stop_agent(jd: JobDir, info: AgentInfo | None, *, timeout: float = 30) -> None:
    """SIGTERM (the agent then ships what is left in the spool), SIGKILL after ``timeout``."""
    if info is None or not agent_running(jd, info):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    try:
        await wait_for_exit(info.pid, timeout)
    except TimeoutError:
        log.warning("job %s: agent (pid %d) did not stop within %g s; killing it",
                    jd.job_id, info.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await wait_for_exit(info.pid, 10)


async def ship_last_wal(jd: JobDir, store: Store, report: Progress, *,
                        timeout: float) -> None:
    """Before a crashed job's local data is discarded: let its agent upload the finished
    WAL still in the spool (or, if the agent is dead too, do it here), then stop what is
    left. What is not in the store by then is lost."""
    info = read_agent(jd)
    if agent_running(jd, info):
        if await asyncio.to_thread(spool_backlog, jd):
            await report("shipping the last WAL")
        for _ in range(int(timeout / 0.1)):  # the agent ships segments as they appear
            if not (await asyncio.to_thread(spool_backlog, jd) and agent_running(jd, info)):
                break
            await asyncio.sleep(0.1)
        await stop_agent(jd, info, timeout=timeout)  # its final drain takes stragglers
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
