"""One job's machine for the agent's tests: an ``agent init`` cluster, its spool, agents.

``Machine.lose`` is the local stand-in for a lost machine: ``kill -9`` of the
agents (and their ``pg_receivewal``), of the postmaster and its children,
and PGDATA and the spool deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from jobmesh.agent.init import init_pgdata
from jobmesh.agent.postgres import Instance, free_port, give_to_postgres
from jobmesh.agent.walnames import parse_lsn
from tests.support.failure_logs import tell_if_failed
from tests.support.process import LoggedProcess
from tests.support.stores import StoreSpec
from tests.support.waiting import until


@dataclass
class Machine:
    """One job's PGDATA, spool and agent: what a lost machine loses."""

    job: str
    base: Path
    spec: StoreSpec
    inst: Instance
    agents: list[LoggedProcess] = field(default_factory=list)

    @property
    def pgdata(self) -> Path:
        return self.base / "pgdata"

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    def start_agent(self, *flags: str) -> LoggedProcess:
        cmd = [sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
               "--pgdata", str(self.pgdata),
               "--spool", str(self.spool), *self.spec.cli_args(self.job),
               "--listen", "127.0.0.1:0", *flags]
        agent = LoggedProcess("agent", cmd, self.base / f"agent-{len(self.agents) + 1}.log")
        self.agents.append(agent)
        agent.port = int(agent.wait_for_log(  # type: ignore[attr-defined]
            r"agent listening on http://[\d.]+:(\d+)").group(1))
        return agent

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(host=str(self.inst.socket_dir), port=self.inst.port,
                                     user="postgres", database=f"job_{self.job}")

    def lose(self) -> float:
        """kill -9 the agent (and its pg_receivewal), the postmaster and its children;
        delete PGDATA and the spool. Returns when the kill began (time.time())."""
        killed_at = time.time()
        for agent in self.agents:
            if agent.proc.poll() is None:
                children = _children(agent.proc.pid)
                agent.proc.kill()
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                agent.proc.wait()
        pids = working_in(self.pgdata)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while working_in(self.pgdata):
            assert time.monotonic() < deadline, "the killed server's processes stay"
            time.sleep(0.05)
        shutil.rmtree(self.pgdata)
        shutil.rmtree(self.spool)
        return killed_at

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.inst.stop_quietly()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def working_in(pgdata: Path) -> list[int]:
    """Pids of processes working in ``pgdata`` (every Postgres process chdirs there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd") == str(pgdata):
                    pids.append(int(entry.name))
    return pids


def status(agent: LoggedProcess) -> dict[str, Any]:
    url = f"http://127.0.0.1:{agent.port}/status"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def astatus(agent: LoggedProcess) -> dict[str, Any]:
    return await asyncio.to_thread(status, agent)


@contextlib.contextmanager
def machines(pg_root: Path, store_spec: StoreSpec,
             node: pytest.Item | None = None) -> Iterator[Callable[..., Machine]]:
    """Make machines (``make(job)``: an ``agent init`` cluster, started); all stopped at the
    end, even when the test fails (``node``'s failure shows their logs' ends)."""
    made: list[Machine] = []

    def make(job: str, *, archive_timeout: int = 3600) -> Machine:
        base = pg_root / f"{job}-{os.urandom(3).hex()}"
        base.mkdir()
        give_to_postgres(base)
        init_pgdata(base / "pgdata", job, spool=base / "spool", archive_timeout=archive_timeout)
        m = Machine(job, base, store_spec, Instance(base / "pgdata", port=free_port()))
        made.append(m)
        m.inst.start()
        return m

    try:
        yield make
    finally:
        for m in made:
            m.stop()
            if node is not None:
                tell_if_failed(node, m.base)


def post(agent: LoggedProcess, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{agent.port}{path}",  # type: ignore[attr-defined]
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def streamed_past(agent: LoggedProcess, lsn: str) -> None:
    async def there() -> bool:
        s = await astatus(agent)
        return parse_lsn(s["stream"]["streamed_lsn"]) >= parse_lsn(lsn)

    await until(there, f"WAL up to {lsn} to be streamed to the store")
