"""What the router-on-the-catalog tests play with: the controller's part, routers,
a wire client that shows notices, and a TCP proxy that can cut the catalog off.

No controller exists in these tests: ``FakeController`` plays it through the
catalog API, resuming paused jobs that are wanted running, and counts its
resumes. Jobs run on one PostgreSQL shaped as ``agent init`` makes a job's:
roles ``job_owner`` and ``job_reader``, database ``job_<id>``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from scramp import ScramClient

from jobmesh.agent.postgres import Instance, free_port
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import JOBS_CHANNEL, Job
from jobmesh.router.credentials import make_verifier
from tests.support.mesh import router_dsn
from tests.support.router import RouterProcess
from tests.support.wire import error_fields, pmsg, startup_packet

JOB_IDS = ("alpha", "beta")
PW = "s3cret"


# --- jobs and users in the catalog -------------------------------------------------------


def make_job_databases(inst: Instance) -> None:
    """Roles and a database per id in ``JOB_IDS``, as a job's PostgreSQL has them."""
    inst.psql("CREATE ROLE job_owner LOGIN")
    inst.psql("CREATE ROLE job_reader LOGIN")
    for job_id in JOB_IDS:
        db = f"job_{job_id}"
        inst.psql(f"CREATE DATABASE {db} OWNER job_owner")
        inst.psql(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC")
        inst.psql(f"GRANT CONNECT ON DATABASE {db} TO job_reader")
        inst.psql("GRANT USAGE ON SCHEMA public TO job_reader", database=db)
        inst.psql("SET ROLE job_owner; CREATE TABLE t (n int); GRANT SELECT ON t TO job_reader",
                  database=db)


def set_backend_password(job_pg: Instance, password: str) -> None:
    for role in ("job_owner", "job_reader"):
        job_pg.psql(f"ALTER ROLE {role} PASSWORD '{password}'")


async def running_job(catalog: Catalog, job_pg: Instance, job_id: str = "alpha") -> Job:
    await catalog.create_job(job_id)
    job = await catalog.transition(job_id, "creating", "running", host="127.0.0.1",
                                   port=job_pg.port)
    assert job is not None
    set_backend_password(job_pg, job.backend_password)
    return job


async def paused_job(catalog: Catalog, job_pg: Instance, job_id: str = "alpha") -> Job:
    await running_job(catalog, job_pg, job_id)
    await catalog.set_desired(job_id, "paused")
    job = await catalog.transition(job_id, "running", "paused")
    assert job is not None
    return job


async def add_user(catalog: Catalog, name: str, *grants: tuple[str, str],
                   admin: bool = False) -> None:
    await catalog.create_principal(name, str(make_verifier(PW)), admin=admin)
    for pattern, access in grants:
        await catalog.grant(name, pattern, access)


async def wakes_requested(catalog: Catalog, job_id: str = "alpha") -> int:
    return len(await catalog.events(job_id, kind="wake-requested"))


# --- the controller, played by the test ----------------------------------------------


@dataclass
class FakeController:
    """Resumes paused jobs wanted running: resuming, progress lines, running at ``port``."""

    catalog: Catalog
    port: int
    progress: tuple[str, ...] = ("restoring 120 MB",)
    release: asyncio.Event | None = None  # hold each resume (after its progress) until set
    restore_seconds: float = 0.0  # a slow restore
    fail: str | None = None  # fail every attempt with this error instead
    resumes: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def __aenter__(self) -> FakeController:
        changed = asyncio.Event()
        self._conn = await self.catalog.listen({JOBS_CHANNEL: lambda _: changed.set()})
        self._task = asyncio.create_task(self._run(changed))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._conn.close()

    async def _run(self, changed: asyncio.Event) -> None:
        while True:
            changed.clear()
            for job in await self.catalog.jobs():
                if job.state == "paused" and job.desired_state == "running":
                    await self._resume(job.id)
            await changed.wait()

    async def _resume(self, job_id: str) -> None:
        assert await self.catalog.transition(job_id, "paused", "resuming")
        for text in self.progress:
            await self.catalog.set_progress(job_id, text)
        if self.fail:
            for _ in range(3):
                await self.catalog.failed_attempt(job_id, "resuming", self.fail)
            return
        if self.release is not None:
            await self.release.wait()
        await asyncio.sleep(self.restore_seconds)
        if await self.catalog.transition(job_id, "resuming", "running", host="127.0.0.1",
                                         port=self.port):
            self.resumes += 1


# --- routers on the catalog -----------------------------------------------------------


class CatalogRouters:
    def __init__(self) -> None:
        self.routers: list[RouterProcess] = []

    async def start(self, dsn: str, *args: str, dsn_in_env: bool = False) -> RouterProcess:
        """A router on the catalog at ``dsn`` (``--catalog-dsn``, or JOBMESH_CATALOG_DSN),
        logged in as the routers' role (migration 0008) when ``dsn`` is the superuser's:
        every router test shows that role is enough."""
        if urlsplit(dsn).username == "postgres":
            dsn = router_dsn(dsn)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if dsn_in_env:
            env["JOBMESH_CATALOG_DSN"] = dsn
        else:
            args = ("--catalog-dsn", dsn, *args)
        router = self._spawn([sys.executable, "-m", "jobmesh", "--log-level", "DEBUG", "router",
                              "--listen", "127.0.0.1:0", *args], env)
        m = await asyncio.to_thread(router.wait_for_log, r"router listening on [\d.]+:(\d+)")
        router.port = int(m.group(1))
        return router

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> RouterProcess:
        router = RouterProcess(cmd, Path(os.devnull), env)
        self.routers.append(router)
        return router

    def stop_all(self) -> list[str]:
        """Stop every router; their log lines not yet read."""
        lines: list[str] = []
        for r in self.routers:
            r.stop()
            lines += r.seen
            while not r.lines.empty():
                lines.append(r.lines.get())
        return lines


async def log_line(router: RouterProcess, pattern: str) -> None:
    await asyncio.to_thread(router.wait_for_log, pattern)


def dsn(router: RouterProcess, user: str = "alice", db: str = "job_alpha") -> str:
    return f"postgresql://{user}:{PW}@127.0.0.1:{router.port}/{db}"


async def query(router: RouterProcess, sql: str, user: str = "alice", db: str = "job_alpha"):
    conn = await asyncpg.connect(dsn(router, user, db), timeout=60)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


# --- a wire client that shows notices and SQLSTATEs ------------------------------------


@dataclass
class Login:
    notices: list[str]
    error: dict[str, str] | None  # the ErrorResponse's fields; None: ReadyForQuery


async def wire_login(port: int, user: str = "alice", password: str = PW,
                     database: str = "job_alpha", on_notice=lambda text: None) -> Login:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    notices: list[str] = []
    try:
        writer.write(startup_packet({"user": user, "database": database}))
        scram = ScramClient(["SCRAM-SHA-256"], user, password)
        while True:
            kind, length = struct.unpack("!cI", await reader.readexactly(5))
            body = await reader.readexactly(length - 4)
            if kind == b"E":
                return Login(notices, error_fields(body))
            if kind == b"Z":
                return Login(notices, None)
            if kind == b"N":
                fields = error_fields(body)
                assert (fields["S"], fields["C"]) == ("NOTICE", "00000")
                notices.append(fields["M"])
                on_notice(fields["M"])
            elif kind == b"R":
                (code,) = struct.unpack_from("!i", body)
                if code == 10:
                    first = scram.get_client_first().encode()
                    writer.write(pmsg(b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                elif code == 11:
                    scram.set_server_first(body[4:].decode())
                    writer.write(pmsg(scram.get_client_final().encode()))
    finally:
        writer.close()


def assert_error(login: Login, sqlstate: str, hint_part: str) -> dict[str, str]:
    assert login.error is not None, "the connection succeeded"
    assert login.error["C"] == sqlstate, login.error
    assert hint_part in login.error.get("H", ""), login.error
    return login.error


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


async def metric_reaches(port: int, name: str, value: float, timeout: float = 60) -> None:
    """Scrape until ``name`` is ``value`` (the router's own view of its waiting clients)."""
    deadline = time.monotonic() + timeout
    while (seen := (await asyncio.to_thread(scrape, port)).get(name)) != value:
        assert time.monotonic() < deadline, f"{name} stayed at {seen}, never {value}"
        await asyncio.sleep(0.05)


# --- waiting on the catalog ----------------------------------------------------------------


async def row_becomes(catalog: Catalog, done, job_id: str = "alpha", timeout: float = 20) -> Job:
    """Wait (on NOTIFY) until ``done(row)``."""
    changed = asyncio.Event()
    conn = await catalog.listen({JOBS_CHANNEL: lambda _: changed.set()})
    try:
        async with asyncio.timeout(timeout):
            while not done(job := await catalog.job(job_id)):
                await changed.wait()
                changed.clear()
            return job
    finally:
        await conn.close()


async def last_active_moves(catalog: Catalog, then=None, timeout: float = 20) -> None:
    job = await catalog.job("alpha")
    assert job is not None
    if then is not None:
        await then()
    deadline = time.monotonic() + timeout
    while (now := await catalog.job("alpha")) is not None and now.last_active == job.last_active:
        assert time.monotonic() < deadline, "the router never touched the job"
        await asyncio.sleep(0.05)


# --- cutting the catalog off ------------------------------------------------------------


class TcpProxy:
    """Relays TCP to ``upstream``; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.port = upstream, free_port()
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.writers |= {writer, up_writer}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer),
                             return_exceptions=True)
