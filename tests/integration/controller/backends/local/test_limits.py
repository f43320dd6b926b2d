"""Each local job in cgroups of its own: its spec's CPU and memory limits, and no bad neighbour.

Real parts: the local backend with real PostgreSQL 15 processes in real
cgroups (v1 here), a file:// store, and a job that allocates past its memory
limit until the kernel kills one of its processes. The latency side of the
bad-neighbour story (a neighbour's pgbench p95 with and without limits) is a
measurement, in ``bench/scale.py``; these tests check the behaviour: what
runs where, with which settings, and that a job's memory kill touches only
that job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from jobmesh.controller.backends.local.backend import LocalBackend
from jobmesh.controller.backends.local.cgroups import Cgroups, parse_cpu, parse_memory
from jobmesh.controller.backends.local.process import JobDir, postmaster
from jobmesh.controller.backends.pg_tuning import memory_settings
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.core.backend import Started
from tests.support.local_jobs import MakeJob, making_jobs
from tests.support.mesh import children_of
from tests.support.template_store import seed_store
from tests.support.waiting import until

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(Cgroups(Path("/nonexistent-root")).mode is None,
                                 reason="no writable cgroups here")]


@pytest.fixture(scope="session")
def limits_root(pg_root: Path) -> Path:
    root = pg_root / "local-limits"
    root.mkdir(mode=0o755, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def limits_store_url(pg_root: Path, template_store: Path) -> str:
    path = pg_root / "local-limits-store"
    seed_store(template_store, path)
    return f"file://{path}"


@pytest.fixture
async def backend(limits_root: Path, limits_store_url: str) -> AsyncIterator[LocalBackend]:
    b = LocalBackend(limits_root, limits_store_url, spares=0)
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def new_job(backend: LocalBackend, catalog: Catalog) -> AsyncIterator[MakeJob]:
    async with making_jobs(backend, catalog, "l") as make:
        yield make


async def _said(_text: str) -> None:
    pass


async def _connect(started: Started, job) -> asyncpg.Connection:
    return await asyncpg.connect(host=started.host, port=started.port, user="job_owner",
                                 password=job.backend_password, database=job.database)


def _members(group: Path) -> set[int]:
    return {int(p) for p in (group / "cgroup.procs").read_text().split()}


def test_quantities_parse_as_kubernetes_writes_them():
    assert [parse_cpu(t) for t in ("2", "0.5", "500m")] == [2.0, 0.5, 0.5]
    assert [parse_memory(t) for t in ("256Mi", "1Gi", "1G", "1000")] == [
        256 * 2**20, 2**30, 10**9, 1000]


def test_memory_settings_follow_the_limit():
    assert memory_settings(None) == {}
    assert memory_settings(256 * 2**20) == {"shared_buffers": "32MB",
                                           "effective_cache_size": "192MB",
                                           "work_mem": "1024kB",
                                           "maintenance_work_mem": "16MB"}
    assert memory_settings(4 * 2**30)["shared_buffers"] == "512MB"
    assert memory_settings(2**30)["shared_buffers"] == "128MB"  # PostgreSQL's own default


async def test_a_job_runs_in_its_cgroups_with_its_limits_and_settings(backend, new_job):
    job = await new_job({"cpu": "500m", "memory": "256Mi"})
    started = await backend.create(job, _said)
    pm = postmaster(JobDir(backend.root, job.id))
    assert pm is not None
    everyone = {pm.pid, *children_of(pm.pid)}
    groups = backend.cgroups.groups(job.id)
    assert groups and all(everyone <= _members(g) for g in groups)
    if backend.cgroups.mode == "v1":
        cpu, memory = groups
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert int((memory / "memory.limit_in_bytes").read_text()) == 256 * 2**20
    else:
        assert (groups[0] / "cpu.max").read_text().split() == ["50000", "100000"]
        assert int((groups[0] / "memory.max").read_text()) == 256 * 2**20
    conn = await _connect(started, job)
    try:
        assert await conn.fetchval("SHOW shared_buffers") == "32MB"
        assert await conn.fetchval("SHOW work_mem") == "1MB"
        kinds = {r[0] for r in await conn.fetch("SELECT backend_type FROM pg_stat_activity")}
    finally:
        await conn.close()
    assert "logical replication launcher" not in kinds  # trimmed: one process fewer per job


async def test_a_job_without_limits_in_its_spec_gets_the_backend_defaults(
        limits_root, limits_store_url, catalog):
    b = LocalBackend(limits_root, limits_store_url, spares=0, job_cpu="2", job_memory="512Mi")
    await b.start()
    try:
        async with making_jobs(b, catalog, "d") as make:
            job = await make()
            await b.create(job, _said)
            groups = b.cgroups.groups(job.id)
            if b.cgroups.mode == "v1":
                assert (groups[0] / "cpu.cfs_quota_us").read_text().strip() == "200000"
                assert int((groups[1] / "memory.limit_in_bytes").read_text()) == 512 * 2**20
    finally:
        await b.close()


async def test_a_job_past_its_memory_limit_is_killed_alone_and_recovers_in_place(
        backend, new_job):
    a, b = await new_job(), await new_job({"memory": "256Mi"})
    started_a, started_b = await backend.create(a, _said), await backend.create(b, _said)
    pm_a = postmaster(JobDir(backend.root, a.id)).pid
    pm_b = postmaster(JobDir(backend.root, b.id)).pid
    a_conn = await _connect(started_a, a)
    b_conn = await _connect(started_b, b)
    try:
        a_backend = await a_conn.fetchval("SELECT pg_backend_pid()")
        await b_conn.execute("CREATE TABLE kept AS SELECT generate_series(1, 1000) AS id")
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                            ConnectionError)):
            # 600 MB in one backend, against 256 MiB: the kernel kills it.
            await b_conn.fetchval("SELECT length(string_agg(repeat('x', 10000000), '')) "
                                  "FROM generate_series(1, 60)", timeout=120)
    finally:
        await b_conn.close(timeout=5)
    memory_group = backend.cgroups.groups(b.id)[-1]
    if backend.cgroups.mode == "v1":
        assert int((memory_group / "memory.failcnt").read_text()) > 0
    # B's own PostgreSQL restarts its backends and recovers in place: its postmaster
    # lives on and has every committed row.
    async def reconnected() -> asyncpg.Connection | None:
        try:
            return await _connect(started_b, b)
        except (OSError, asyncpg.PostgresError):
            return None

    again = await until(reconnected, f"job {b.id} accepting connections again", timeout=60)
    try:
        assert await again.fetchval("SELECT count(*) FROM kept") == 1000
    finally:
        await again.close()
    assert postmaster(JobDir(backend.root, b.id)).pid == pm_b
    assert await backend.alive(b) is True
    # A never noticed: the same postmaster, and its session is the same backend.
    try:
        assert await a_conn.fetchval("SELECT pg_backend_pid()") == a_backend
    finally:
        await a_conn.close()
    assert postmaster(JobDir(backend.root, a.id)).pid == pm_a
