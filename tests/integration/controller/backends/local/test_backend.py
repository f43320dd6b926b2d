"""The local backend with real processes: PostgreSQL 15, ``jobmesh agent serve``, a file:// store.

Jobs come from a real catalog (for their backend passwords). Every job a
test makes is deleted by a fixture finaliser, and anything of it still
running afterwards is killed, also when the test fails. Waits poll a
condition against a deadline; nothing sleeps for a fixed time.

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures; its helpers live in tests/support.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from jobmesh.agent.manifest import Manifest, snapshot_manifest_key, wal_key
from jobmesh.agent.postgres import bin_dir, pid_alive
from jobmesh.agent.snapshot import parse_controldata
from jobmesh.agent.store import get_bytes, open_store
from jobmesh.controller.backends.job_database import connect
from jobmesh.controller.backends.job_store import latest_snapshot
from jobmesh.controller.backends.local.backend import LocalBackend
from jobmesh.controller.backends.local.process import (
    JobDir,
    cleanly_stopped,
    kill_leftovers,
    postmaster,
)
from jobmesh.controller.backends.local.warm_cache import Entry, evictions
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import Job
from jobmesh.controller.core.backend import BackendError, PermanentError, Started
from tests.support.local_jobs import MakeJob, making_jobs
from tests.support.mesh import pids_mentioning
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(180)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_root(pg_root: Path) -> Path:
    """One backend root for the session: the template's local copies are made once."""
    root = pg_root / "local"
    root.mkdir(mode=0o755, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def store_url(pg_root: Path) -> str:
    """One file:// store for the session (the postgres user reads WAL from it in recovery)."""
    path = pg_root / "local-store"
    path.mkdir(mode=0o755, exist_ok=True)
    return f"file://{path}"


@pytest.fixture
async def backend(local_root: Path, store_url: str) -> AsyncIterator[LocalBackend]:
    b = LocalBackend(local_root, store_url)
    await b.start()
    yield b
    await b.close()
    await spare_copies_finished(local_root)


async def spare_copies_finished(root: Path) -> None:
    """Wait until no spare copy of the template is half made under ``root``.

    A backend's close() cancels the task that makes spares, but the ``cp`` it runs in a
    thread goes on, and renames its copy into place when done. The next backend on the
    same root (the next test) deletes half-made copies when it starts: the thread then
    renamed a copy with files missing into a spare, and a create that took it failed
    with "pg_ctl: directory .../pgdata is not a database cluster directory". The copy
    runs inside the backend, where nothing announces its end: look at the directory."""

    def finished() -> bool:
        return not any(p.name.startswith(".") for p in root.glob("template/*/spares/*"))

    await until(lambda: asyncio.to_thread(finished), f"the spare copies under {root}",
                timeout=60)


@pytest.fixture
async def new_job(backend: LocalBackend, catalog: Catalog) -> AsyncIterator[MakeJob]:
    """Makes catalog jobs; afterwards each is deleted and whatever of it runs is killed."""
    async with making_jobs(backend, catalog, "t") as make:
        yield make



MakeBackend = Callable[..., Awaitable[LocalBackend]]


@pytest.fixture
async def other_backend(pg_root: Path, store_url: str, new_job: MakeJob
                        ) -> AsyncIterator[MakeBackend]:
    """Makes backends with the session's store under ``pg_root/<name>`` (another machine,
    or this one restarted with other settings; a name keeps its template copy across
    tests). Afterwards everything that runs under their roots is killed, their jobs' and
    cache directories are removed, and they are closed (before new_job's finaliser deletes
    the jobs' stored objects)."""
    made: list[LocalBackend] = []

    async def make(name: str = "other", **settings: Any) -> LocalBackend:
        b = LocalBackend(pg_root / name, store_url, **{"spares": 0, **settings})
        made.append(b)
        await b.start()
        return b

    yield make
    for b in made:
        with contextlib.suppress(FileNotFoundError):
            for jd in [JobDir(b.root, e.name) for e in (b.root / "jobs").iterdir()]:
                await kill_leftovers(jd.pgdata)
        for pid in pids_mentioning(str(b.root) + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await b.close()
        await spare_copies_finished(b.root)
        for d in ("jobs", "cache"):
            await asyncio.to_thread(shutil.rmtree, b.root / d, True)


class Said(list[str]):
    """A progress callback that remembers what it was told."""

    async def __call__(self, text: str) -> None:
        self.append(text)


async def connect_as(started: Started, job: Job, role: str = "job_owner") -> asyncpg.Connection:
    return await asyncpg.connect(host=started.host, port=started.port, user=role,
                                 password=job.backend_password, database=job.database)


async def write_items(started: Started, job: Job, first: int, last: int) -> None:
    conn = await connect_as(started, job)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, v text)")
        await conn.execute("INSERT INTO items SELECT g, md5(g::text) FROM generate_series($1::int,"
                           " $2::int) g", first, last)
    finally:
        await conn.close()


async def count_items(started: Started, job: Job) -> int:
    conn = await connect_as(started, job)
    try:
        return await conn.fetchval("SELECT count(*) FROM items")
    finally:
        await conn.close()


async def stored_base_backup(backend: LocalBackend, job: Job) -> Manifest | None:
    m = await latest_snapshot(backend.store, job.id)
    return m if m is not None and m.kind == "base" else None


# --- create ----------------------------------------------------------------------------------


async def test_create_starts_a_job_its_owner_can_write_to_over_tcp(backend, new_job):
    job = await new_job()
    t = time.perf_counter()
    started = await backend.create(job, Said())
    elapsed = (time.perf_counter() - t) * 1000
    print(f"\ncreate: {elapsed:.0f} ms end to end; {started.detail}")
    assert started.host == "127.0.0.1" and started.bytes_moved == 0
    await write_items(started, job, 1, 100)
    assert await count_items(started, job) == 100
    jd = JobDir(backend.root, job.id)
    await backend.agents.settle()  # (the agent is started, not waited for)
    info = await backend.agents.agent(job.id)
    assert info is not None and started.agent_url == info.url and backend.agents.running()
    assert postmaster(jd).port == started.port


async def test_a_port_taken_before_postgres_binds_it_is_traded_for_another(backend, new_job,
                                                                          monkeypatch):
    import socket

    from jobmesh.agent.postgres import free_port
    from jobmesh.controller.backends.local import instance

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # a server that started between the pick and PostgreSQL's bind
    held = taken.getsockname()[1]
    picks = iter([held])
    monkeypatch.setattr(instance, "free_port", lambda: next(picks, None) or free_port())
    try:
        job = await new_job()
        started = await backend.create(job, Said())
    finally:
        taken.close()
    assert started.port != held
    await write_items(started, job, 1, 10)
    assert postmaster(JobDir(backend.root, job.id)).port == started.port


async def test_a_new_job_gets_its_first_recovery_point_at_once(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await until(lambda: stored_base_backup(backend, job), "the first base backup")

    async def healthy() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{started.agent_url}/healthz") as r:
            return r.status == 200

    assert await healthy()


async def test_create_again_adopts_the_running_instance(backend, new_job):
    job = await new_job()
    first = await backend.create(job, Said())
    pid = postmaster(JobDir(backend.root, job.id)).pid
    second = await backend.create(job, Said())
    assert (second.port, second.agent_url) == (first.port, first.agent_url)
    assert second.detail.get("adopted") is True
    assert postmaster(JobDir(backend.root, job.id)).pid == pid


async def test_create_after_an_interrupted_create_starts_over(backend, new_job):
    job = await new_job()
    await backend.create(job, Said())
    jd = JobDir(backend.root, job.id)
    old = postmaster(jd).pid
    jd.ready.unlink()  # as if the controller died before the setup finished
    started = await backend.create(job, Said())
    assert not pid_alive(old) and postmaster(jd).pid != old
    await write_items(started, job, 1, 10)


async def test_a_job_with_the_longest_id_still_gets_a_unix_socket(backend, new_job):
    job = await new_job(job_id=f"t-{os.urandom(3).hex()}".ljust(59, "x"))
    started = await backend.create(job, Said())
    jd = JobDir(backend.root, job.id)
    assert len(str(jd.path / "run" / ".s.PGSQL.65535")) > 107  # so another directory is used
    su = await connect(jd.run, started.port)
    await su.close()
    await write_items(started, job, 1, 3)


async def test_a_restarted_controller_adopts_the_running_jobs(local_root, store_url, backend,
                                                               new_job):
    job = await new_job()
    first = await backend.create(job, Said())
    await backend.close()  # the controller goes away; its jobs keep running
    successor = LocalBackend(local_root, store_url)
    await successor.start()
    try:
        assert await successor.alive(job) is True
        adopted = await successor.create(job, Said())
        assert (adopted.port, adopted.agent_url) == (first.port, first.agent_url)
        stopped = await successor.pause(job)  # its agent is not the successor's child
        assert stopped.manifest.kind == "pause"
    finally:
        await successor.close()


async def test_the_reader_can_select_but_never_write(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 5)
    reader = await connect_as(started, job, "job_reader")
    try:
        assert await reader.fetchval("SELECT count(*) FROM items") == 5
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await reader.execute("INSERT INTO items VALUES (6, 'x')")
        await reader.execute("SET default_transaction_read_only = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("INSERT INTO items VALUES (6, 'x')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("CREATE TABLE mine (x int)")
    finally:
        await reader.close()


async def test_create_loads_a_dump_file_owned_by_the_job(backend, new_job, pg, pg_root):
    # A source database with its own owner and grants, which do not exist in the job.
    source = f"src_{os.urandom(3).hex()}"
    pg.psql(f"CREATE DATABASE {source}")
    pg.psql(f"CREATE ROLE {source}_app;"
            " CREATE TABLE items (id int PRIMARY KEY, v text);"
            " INSERT INTO items SELECT g, g::text FROM generate_series(1, 250) g;"
            " CREATE SCHEMA extra; CREATE TABLE extra.notes AS SELECT 1 AS n;"
            f" GRANT SELECT ON items TO {source}_app;"
            f" ALTER TABLE items OWNER TO {source}_app", database=source)
    path = pg_root / f"{source}.pgdump"
    await asyncio.to_thread(
        subprocess.run, [str(bin_dir() / "pg_dump"), "-Fc", "-f", str(path), "-h",
                         str(pg.socket_dir), "-p", str(pg.port), "-U", "postgres", source],
        check=True, timeout=60)
    job = await new_job({"source": {"dump": str(path)}})
    said = Said()
    started = await backend.create(job, said)
    assert any(text.startswith(f"importing {path.name}") for text in said)
    assert await count_items(started, job) == 250
    owner = await connect_as(started, job)
    try:
        assert await owner.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'items'"
                                    ) == "job_owner"
    finally:
        await owner.close()
    reader = await connect_as(started, job, "job_reader")
    try:
        assert await reader.fetchval("SELECT n FROM extra.notes") == 1
    finally:
        await reader.close()


async def test_a_source_it_cannot_load_is_one_line(backend, new_job):
    job = await new_job({"source": {"clone": "other"}})
    with pytest.raises(BackendError) as err:
        await backend.create(job, Said())
    assert "\n" not in str(err.value) and "unsupported job source" in str(err.value)


async def test_a_fork_of_a_job_without_snapshots_is_one_line(backend, new_job):
    job = await new_job({"source": {"fork": "nobody"}})
    with pytest.raises(PermanentError) as err:
        await backend.create(job, Said())
    assert "\n" not in str(err.value) and "nobody has no snapshot" in str(err.value)


# --- pause and resume --------------------------------------------------------------------


async def test_pause_stores_a_pause_snapshot_and_leaves_nothing_running(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 1000)
    jd = JobDir(backend.root, job.id)
    pg_pid = postmaster(jd).pid
    await backend.agents.settle()
    assert await backend.agents.agent(job.id) is not None
    t = time.perf_counter()
    stopped = await backend.pause(job)
    print(f"\npause: {(time.perf_counter() - t) * 1000:.0f} ms, {stopped.bytes_moved} bytes stored")
    assert stopped.manifest.kind == "pause" and stopped.bytes_moved > 0
    assert not pid_alive(pg_pid) and await backend.agents.agent(job.id) is None
    assert not jd.path.exists()
    assert await backend.alive(job) is False
    stored = await get_bytes(backend.store, snapshot_manifest_key(job.id, stopped.manifest.id))
    assert Manifest.from_json(stored) == stopped.manifest
    again = await backend.pause(job)  # a retry after the local copy is gone
    assert again.manifest == stopped.manifest


async def test_resume_brings_the_data_back(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 5000)
    await backend.pause(job)
    await backend.warm_cache.drop(job.id)  # from the store (the warm cache has its own tests)
    said = Said()
    t = time.perf_counter()
    resumed = await backend.resume(job, said)
    print(f"\nresume: {(time.perf_counter() - t) * 1000:.0f} ms, {resumed.bytes_moved} bytes "
          f"restored; {resumed.detail}")
    assert said[0].startswith("restoring ") and said[0].endswith(" MB")
    assert "starting PostgreSQL" in said
    assert resumed.bytes_moved > 0 and resumed.detail["kind"] == "pause"
    assert resumed.detail["source"] == "store"
    assert await count_items(resumed, job) == 5000
    await write_items(resumed, job, 5001, 5010)  # and it takes writes
    again = await backend.resume(job, Said())
    assert again.port == resumed.port and again.detail.get("adopted") is True


async def test_a_job_paused_twice_resumes_the_second_time_too(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 10)
    await backend.pause(job)
    resumed = await backend.resume(job, Said())
    await write_items(resumed, job, 11, 20)
    await backend.pause(job)
    resumed = await backend.resume(job, Said())
    assert await count_items(resumed, job) == 20


# --- the warm cache ------------------------------------------------------------------------


def _entry(backend: LocalBackend, job: Job) -> Path:
    return backend.root / "cache" / job.id


def _marker(backend: LocalBackend, job: Job) -> dict[str, Any]:
    return json.loads((_entry(backend, job) / "entry.json").read_text())


def test_eviction_takes_the_least_recently_cached_entries_until_the_new_one_fits():
    a, b, c = Entry("a", "s1", 40, 1.0), Entry("b", "s2", 40, 3.0), Entry("c", "s3", 40, 2.0)
    assert evictions([a, b, c], 10, 130) == []
    assert evictions([a, b, c], 40, 130) == [a]
    assert evictions([a, b, c], 40, 100) == [a, c]
    assert evictions([a, b, c], 100, 100) == [a, c, b]


def test_an_entry_bigger_than_the_bound_is_never_admitted():
    assert evictions([], 101, 100) is None
    assert evictions([Entry("a", "s1", 1, 1.0)], 101, 100) is None


def test_a_marker_counts_only_whole_and_for_its_own_job():
    e = Entry("a", "s1", 7, 2.5)
    assert Entry.from_json(e.to_json(), "a") == e
    assert Entry.from_json(e.to_json(), "b") is None
    assert Entry.from_json(e.to_json()[:12], "a") is None
    assert Entry.from_json(b'{"job": "a", "snapshot": "", "size": 7, "cached_at": 1}', "a") is None


async def test_pause_keeps_the_pgdata_of_its_snapshot_in_the_warm_cache(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 1000)
    stopped = await backend.pause(job)
    assert not JobDir(backend.root, job.id).path.exists()
    entry = _entry(backend, job)
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "pgdata"]
    marker = _marker(backend, job)
    assert marker["job"] == job.id and marker["snapshot"] == stopped.manifest.id
    assert marker["size"] > stopped.bytes_moved  # PGDATA, uncompressed
    proc = await asyncio.to_thread(  # as root: the cache is root's (0700)
        subprocess.run, [str(bin_dir() / "pg_controldata"), str(entry / "pgdata")],
        capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"},
        timeout=30)
    control = parse_controldata(proc.stdout)
    assert control.state == "shut down"
    assert control.checkpoint_lsn == stopped.manifest.start_lsn  # the snapshot's cluster


async def test_resume_from_the_warm_cache_brings_the_data_back_without_a_restore(backend,
                                                                                  new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 5000)
    stopped = await backend.pause(job)
    said = Said()
    t = time.perf_counter()
    resumed = await backend.resume(job, said)
    cache_ms = (time.perf_counter() - t) * 1000
    assert resumed.detail["source"] == "cache" and resumed.bytes_moved == 0
    assert resumed.detail["snapshot"] == stopped.manifest.id
    assert not any(text.startswith("restoring") for text in said)
    assert not _entry(backend, job).exists()  # used once: the job runs on it now
    assert await count_items(resumed, job) == 5000
    await write_items(resumed, job, 5001, 5010)
    # The same job, paused again, from the store, for comparison.
    await backend.pause(job)
    await backend.warm_cache.drop(job.id)
    t = time.perf_counter()
    restored = await backend.resume(job, Said())
    store_ms = (time.perf_counter() - t) * 1000
    assert restored.detail["source"] == "store" and restored.bytes_moved > 0
    assert await count_items(restored, job) == 5010
    print(f"\nresume from the warm cache: {cache_ms:.0f} ms {resumed.detail['timings_ms']}"
          f"\nresume from the store: {store_ms:.0f} ms {restored.detail['timings_ms']}")


async def test_a_second_pause_replaces_the_entry_with_its_own_snapshot(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 10)
    first = await backend.pause(job)
    resumed = await backend.resume(job, Said())
    assert resumed.detail["source"] == "cache"
    await write_items(resumed, job, 11, 20)
    second = await backend.pause(job)
    assert second.manifest.id != first.manifest.id
    assert _marker(backend, job)["snapshot"] == second.manifest.id
    resumed = await backend.resume(job, Said())
    assert resumed.detail["source"] == "cache"
    assert await count_items(resumed, job) == 20


async def test_an_entry_is_stale_once_the_job_was_paused_on_another_machine(backend, new_job,
                                                                              other_backend):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 100)
    await backend.pause(job)
    other = await other_backend()
    elsewhere = await other.resume(job, Said())
    assert elsewhere.detail["source"] == "store"
    await write_items(elsewhere, job, 101, 200)
    second = await other.pause(job)
    resumed = await backend.resume(job, Said())
    assert resumed.detail["source"] == "store"
    assert resumed.detail["snapshot"] == second.manifest.id
    assert await count_items(resumed, job) == 200
    assert not _entry(backend, job).exists()


async def test_an_entry_is_stale_once_wal_was_archived_after_its_pause(backend, new_job,
                                                                       other_backend):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 100)
    paused = await backend.pause(job)
    # The job runs on another machine, archives WAL and is lost with that machine.
    other = await other_backend()
    elsewhere = await other.resume(job, Said())
    await write_items(elsewhere, job, 101, 3000)
    jd = JobDir(other.root, job.id)
    su = await connect(jd.run, elsewhere.port)
    try:
        segment = await su.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
    finally:
        await su.close()

    async def shipped() -> bool:
        return await other.store.size(wal_key(job.id, segment)) is not None

    await until(shipped, f"{segment} in the store")
    for pid in (postmaster(jd).pid, backend.agents.read().pid):  # its agent: the host
        os.kill(pid, signal.SIGKILL)
        await until(lambda pid=pid: _is(asyncio.to_thread(pid_alive, pid), False),
                    f"the death of {pid}")
    assert (await latest_snapshot(backend.store, job.id)).id == paused.manifest.id
    resumed = await backend.resume(job, Said())
    assert resumed.detail["source"] == "store" and resumed.detail["wal_replayed"]
    assert await count_items(resumed, job) == 3000
    assert not _entry(backend, job).exists()


async def test_recover_restores_from_the_store_even_with_a_warm_entry(backend, new_job):
    # As after a controller that paused the job but died before the catalog said so: the
    # job counts as running, and its instance is gone.
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 100)
    await backend.pause(job)
    assert _entry(backend, job).exists()
    recovered = await backend.recover(job, Said())
    assert recovered.detail["source"] == "store" and recovered.bytes_moved > 0
    assert await count_items(recovered, job) == 100
    assert not _entry(backend, job).exists()


async def test_without_a_warm_cache_pause_deletes_and_resume_restores(pg_root, other_backend,
                                                                      new_job):
    (pg_root / "nocache" / "cache" / "t-left-by-a-run-with-a-cache").mkdir(parents=True,
                                                                             exist_ok=True)
    off = await other_backend("nocache", warm_cache_bytes=0)
    assert not (off.root / "cache").exists()
    job = await new_job()
    started = await off.create(job, Said())
    await write_items(started, job, 1, 100)
    await off.pause(job)
    assert not (off.root / "cache").exists() and not JobDir(off.root, job.id).path.exists()
    resumed = await off.resume(job, Said())
    assert resumed.detail["source"] == "store" and resumed.bytes_moved > 0
    assert await count_items(resumed, job) == 100


async def test_the_least_recently_cached_entries_are_evicted_to_stay_within_the_bound(
        other_backend, new_job):
    big = await other_backend("lru")
    a, b, c = await new_job(), await new_job(), await new_job()
    for job in (a, b):
        started = await big.create(job, Said())
        await write_items(started, job, 1, 100)
        await big.pause(job)
    sizes = {job.id: _marker(big, job)["size"] for job in (a, b)}
    await big.close()
    # Restarted with room for one entry and a half: the older one goes at once...
    bound = max(sizes.values()) * 3 // 2
    small = await other_backend("lru", warm_cache_bytes=bound)
    assert not _entry(small, a).exists() and _entry(small, b).exists()
    # ...and the next pause makes room for its own.
    started = await small.create(c, Said())
    await write_items(started, c, 1, 100)
    await small.pause(c)
    assert not _entry(small, b).exists() and _entry(small, c).exists()
    resumed = await small.resume(b, Said())
    assert resumed.detail["source"] == "store" and await count_items(resumed, b) == 100


async def test_a_pgdata_bigger_than_the_bound_is_not_kept(other_backend, new_job):
    tiny = await other_backend("tiny", warm_cache_bytes=1 << 20)
    job = await new_job()
    started = await tiny.create(job, Said())
    await write_items(started, job, 1, 100)
    await tiny.pause(job)
    assert list((tiny.root / "cache").iterdir()) == []
    assert not JobDir(tiny.root, job.id).path.exists()
    resumed = await tiny.resume(job, Said())
    assert resumed.detail["source"] == "store" and await count_items(resumed, job) == 100


async def test_entries_without_a_valid_marker_are_removed_at_start(local_root, store_url,
                                                                    backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 100)
    stopped = await backend.pause(job)
    cache = backend.root / "cache"
    valid = Entry(job.id, stopped.manifest.id, 1, time.time()).to_json()
    (cache / "t-no-marker" / "pgdata").mkdir(parents=True)  # a crash before the marker
    (cache / "t-torn-marker" / "pgdata").mkdir(parents=True)
    (cache / "t-torn-marker" / "entry.json").write_bytes(valid[:20])
    # A move interrupted on its way in, marker and all: never the job's entry.
    incoming = cache / f".incoming-{job.id}-0badf00d"
    (incoming / "pgdata").mkdir(parents=True)
    (incoming / "entry.json").write_bytes(valid)
    restarted = LocalBackend(local_root, store_url)
    await restarted.start()
    try:
        assert sorted(p.name for p in cache.iterdir()) == [job.id]
        resumed = await restarted.resume(job, Said())  # the valid entry outlived the restart
        assert resumed.detail["source"] == "cache" and await count_items(resumed, job) == 100
    finally:
        await restarted.close()


# --- failures -----------------------------------------------------------------------------


async def test_a_killed_postgres_recovers_in_place_with_every_commit(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 3000)  # in the local WAL only: nothing archived
    jd = JobDir(backend.root, job.id)
    await backend.agents.settle()
    agents = backend.agents.read().pid
    os.kill(postmaster(jd).pid, signal.SIGKILL)
    assert await until(lambda: _is(backend.alive(job), False), "the job to be seen dead")
    said = Said()
    job = dataclasses.replace(job, host=started.host, port=started.port)  # as the row says
    recovered = await backend.recover(job, said)
    assert recovered.detail["in_place"] is True and recovered.bytes_moved == 0
    assert not any(text.startswith("restoring ") for text in said)
    assert recovered.port == started.port  # its old port was free: routes need not change
    assert await count_items(recovered, job) == 3000
    # The agent lived on, and serves the new server.
    assert backend.agents.read().pid == agents and await backend.agents.agent(job.id)
    await write_items(recovered, job, 3001, 3010)
    assert await backend.alive(job) is True


async def test_recover_after_the_local_disk_is_lost_keeps_what_was_archived(backend, new_job):
    job = await new_job({"archive_timeout": 1})
    started = await backend.create(job, Said())
    await until(lambda: stored_base_backup(backend, job), "the first base backup")
    await write_items(started, job, 1, 3000)
    jd = JobDir(backend.root, job.id)
    su = await connect(jd.run, started.port)
    try:
        segment = await su.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
    finally:
        await su.close()

    async def shipped() -> bool:
        return await backend.store.size(wal_key(job.id, segment)) is not None

    await until(shipped, f"{segment} in the store")
    for pid in (postmaster(jd).pid, backend.agents.read().pid):  # its agent: the host
        os.kill(pid, signal.SIGKILL)
        await until(lambda pid=pid: _is(asyncio.to_thread(pid_alive, pid), False),
                    f"the death of {pid}")
    await kill_leftovers(jd.pgdata)
    shutil.rmtree(jd.path)  # the machine's disk is gone
    said = Said()
    recovered = await backend.recover(job, said)
    assert recovered.detail["kind"] == "base" and recovered.detail["wal_replayed"]
    assert any(text.startswith("restoring ") for text in said)
    assert await count_items(recovered, job) == 3000
    await write_items(recovered, job, 3001, 3010)
    assert await backend.alive(job) is True


async def test_a_pgdata_that_does_not_start_is_kept_aside_and_the_store_restored(
        backend, new_job):
    job = await new_job({"archive_timeout": 1})
    started = await backend.create(job, Said())
    await until(lambda: stored_base_backup(backend, job), "the first base backup")
    await write_items(started, job, 1, 100)
    jd = JobDir(backend.root, job.id)
    os.kill(postmaster(jd).pid, signal.SIGKILL)
    assert await until(lambda: _is(backend.alive(job), False), "the job to be seen dead")
    await kill_leftovers(jd.pgdata)
    for seg in (jd.pgdata / "pg_wal").iterdir():  # no checkpoint record to start from
        if seg.is_file():
            seg.unlink()
    recovered = await backend.recover(job, Said())
    assert recovered.detail["source"] == "store"
    kept = backend.failed_copies.copies()
    assert len(kept) == 1 and kept[0].name.startswith(f"{job.id}-")
    assert (kept[0] / "pgdata" / "PG_VERSION").is_file() and (kept[0] / "postgres.log").is_file()
    assert await backend.alive(job) is True


async def test_without_the_ready_marker_a_crash_restores_from_the_store(backend, new_job):
    # As after a restore killed mid-unpack: a PGDATA that may start but is not known whole.
    job = await new_job()
    started = await backend.create(job, Said())
    await until(lambda: stored_base_backup(backend, job), "the first base backup")
    await write_items(started, job, 1, 100)
    jd = JobDir(backend.root, job.id)
    su = await connect(jd.run, started.port)
    try:
        await su.execute("CHECKPOINT")
        await su.fetchval("SELECT pg_switch_wal()")
    finally:
        await su.close()
    os.kill(postmaster(jd).pid, signal.SIGKILL)
    jd.ready.unlink()
    recovered = await backend.recover(job, Said())
    assert recovered.detail["source"] == "store"


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


async def test_recover_ships_the_wal_a_dead_agent_left_in_the_spool(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await until(lambda: stored_base_backup(backend, job), "the first base backup")
    jd = JobDir(backend.root, job.id)
    agent_pid = backend.agents.read().pid  # the agent host: every job's agent
    os.kill(agent_pid, signal.SIGKILL)
    await until(lambda: _is(asyncio.to_thread(pid_alive, agent_pid), False), "the agent's death")
    await write_items(started, job, 1, 2000)
    su = await connect(jd.run, started.port)
    try:
        segment = await su.fetchval("SELECT pg_walfile_name(pg_switch_wal())")
    finally:
        await su.close()
    await until(lambda: asyncio.to_thread((jd.spool / segment).exists), f"{segment} spooled")
    pid = postmaster(jd).pid
    os.kill(pid, signal.SIGKILL)  # (not alive(): it would restart the agent first)
    await until(lambda: _is(asyncio.to_thread(pid_alive, pid), False), "the postmaster's death")
    jd.ready.unlink()  # not known whole: restored from the store, after the spool is shipped
    recovered = await backend.recover(job, Said())
    assert await backend.store.size(wal_key(job.id, segment)) is not None
    assert recovered.detail["wal_replayed"]
    assert await count_items(recovered, job) == 2000


async def test_pausing_a_crashed_job_recovers_it_locally_first(backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await write_items(started, job, 1, 500)  # in local WAL only: nothing was archived
    jd = JobDir(backend.root, job.id)
    pid = postmaster(jd).pid
    os.kill(pid, signal.SIGKILL)
    await until(lambda: _is(asyncio.to_thread(pid_alive, pid), False), "the postmaster's death")
    stopped = await backend.pause(job)
    assert stopped.manifest.kind == "pause"
    resumed = await backend.resume(job, Said())
    assert await count_items(resumed, job) == 500


async def test_without_a_recovery_point_a_crashed_job_restarts_from_its_local_data(
        pg_root, store_url, new_job):
    no_backups = LocalBackend(pg_root / f"nobb-{os.urandom(3).hex()}", store_url, spares=0,
                              base_backup_interval=0)
    await no_backups.start()
    try:
        job = await new_job()
        started = await no_backups.create(job, Said())
        await write_items(started, job, 1, 300)
        jd = JobDir(no_backups.root, job.id)
        os.kill(postmaster(jd).pid, signal.SIGKILL)
        assert await until(lambda: _is(no_backups.alive(job), False), "the job to be seen dead")
        recovered = await no_backups.recover(job, Said())
        assert recovered.detail["in_place"] is True
        assert await count_items(recovered, job) == 300
    finally:
        with contextlib.suppress(BackendError):
            await no_backups.delete(job)
        await no_backups.close()


async def test_alive_restarts_a_dead_agent_host_on_its_port_and_puts_the_job_back(
        backend, new_job):
    job = await new_job()
    started = await backend.create(job, Said())
    await backend.agents.settle()
    old = backend.agents.read()
    os.kill(old.pid, signal.SIGKILL)
    await until(lambda: _is(asyncio.to_thread(pid_alive, old.pid), False), "the agent's death")
    assert await backend.alive(job) is True
    new = backend.agents.read()
    assert new.pid != old.pid and backend.agents.running(new)
    assert new.port == old.port  # the agent URL the catalog holds stays right
    info = await backend.agents.agent(job.id)
    assert info is not None and info.url == started.agent_url


async def test_alive_right_after_create_keeps_the_agent_it_started(backend, new_job):
    host = backend.agents.read().pid
    for _ in range(3):
        job = await new_job()
        await backend.create(job, Said())
        assert await backend.alive(job) is True
        await backend.agents.settle()
        assert backend.agents.read().pid == host
        assert await backend.agents.agent(job.id) is not None
    assert len([pid for pid in pids_mentioning(str(backend.agents.state))
                if pid_alive(pid)]) == 1


async def test_alive_without_an_instance_is_false(backend, new_job):
    assert await backend.alive(await new_job()) is False


# --- orphans and delete ------------------------------------------------------------------


async def test_orphans_are_found_and_stopped_keeping_their_data(backend, new_job):
    job = await new_job()
    await backend.create(job, Said())
    jd = JobDir(backend.root, job.id)
    assert job.id in await backend.orphans(set())
    assert job.id not in await backend.orphans({job.id})
    await backend.stop_orphan(job.id)
    assert postmaster(jd) is None and await backend.agents.agent(job.id) is None
    assert (jd.pgdata / "PG_VERSION").exists() and cleanly_stopped(jd.pgdata)


async def test_delete_removes_processes_files_and_stored_objects(backend, new_job):
    job = await new_job()
    await backend.create(job, Said())
    await until(lambda: stored_base_backup(backend, job), "the first base backup")
    jd = JobDir(backend.root, job.id)
    pg_pid = postmaster(jd).pid
    await backend.delete(job)
    assert not pid_alive(pg_pid) and await backend.agents.agent(job.id) is None
    assert not jd.path.exists()
    assert await backend.store.list(f"{job.id}/") == []
    await backend.delete(job)  # and again: nothing left to do


# --- stores -------------------------------------------------------------------------------


async def test_a_job_pauses_to_and_resumes_from_an_s3_store(pg_root, s3_server, catalog):
    bucket = s3_server.create_bucket(f"local-{os.urandom(4).hex()}")
    s3 = LocalBackend(pg_root / f"s3-{os.urandom(3).hex()}", f"s3://{bucket}/jobs",
                      s3_endpoint=s3_server.endpoint, spares=0)
    await s3.start()
    job = await catalog.create_job(f"t-{os.urandom(3).hex()}")
    try:
        started = await s3.create(job, Said())
        await write_items(started, job, 1, 100)
        stopped = await s3.pause(job)
        assert stopped.manifest.kind == "pause"
        resumed = await s3.resume(job, Said())
        assert await count_items(resumed, job) == 100
    finally:
        with contextlib.suppress(BackendError):
            await s3.delete(job)
        await s3.close()


# --- the template --------------------------------------------------------------------------
async def test_a_second_backend_keeps_the_spares_a_live_process_is_copying(local_root,
                                                                            store_url, backend):
    """Only copies a dead process left half made are removed at start: a live one's ``cp``
    would go on into a directory whose first files are gone and hand out a broken copy."""
    spares = local_root / "template" / backend.template.manifest.id / "spares"
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    dead_pid = gone.pid  # that process has exited and been reaped
    assert not pid_alive(dead_pid)
    copying, crashed = spares / f".{os.getpid()}-0copying", spares / f".{dead_pid}-0crashed"
    for scratch in (copying, crashed):
        (scratch / "pgdata").mkdir(parents=True)
        (scratch / "pgdata" / "postgresql.conf").write_text("# half made\n")
    second = LocalBackend(local_root, store_url, spares=0)
    try:
        await second.start()
        assert copying.is_dir() and not crashed.exists()
    finally:
        await second.close()
        shutil.rmtree(copying, ignore_errors=True)




async def test_the_template_is_made_once_per_store(pg_root, store_url, backend, new_job):
    # Another machine (root) with the same store restores the stored template.
    other_root = pg_root / f"other-{os.urandom(3).hex()}"
    other = LocalBackend(other_root, store_url, spares=0)
    await other.start()
    try:
        assert other.template.manifest == backend.template.manifest
        job = await new_job()
        started = await other.create(job, Said())
        assert started.detail["template"] == "copy"
        await write_items(started, job, 1, 3)
        await other.delete(job)
    finally:
        await other.close()
    store = open_store(store_url)
    try:
        name = backend.template.name
        manifests = [o.key for o in await store.list(f"{name}/snapshots/")
                     if o.key.endswith("/manifest.json")]
    finally:
        await store.close()
    assert name == "TEMPLATE-15" and len(manifests) == 1


async def test_a_job_can_read_another_job_through_dblink(backend, new_job):
    source, reader = await new_job(), await new_job()
    src = await backend.create(source, Said())
    await write_items(src, source, 1, 7)
    dst = await backend.create(reader, Said())
    conn = await connect_as(dst, reader)
    try:
        link = (f"host=127.0.0.1 port={src.port} dbname={source.database} user=job_reader "
                f"password={source.backend_password}")
        assert await conn.fetchval("SELECT n FROM dblink($1, 'SELECT count(*) FROM items')"
                                   " AS r(n bigint)", link) == 7
    finally:
        await conn.close()
