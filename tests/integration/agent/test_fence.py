"""Fencing by generation: one incarnation of a job writes to its store prefix at a time.

A newer claim stops a running agent and its PostgreSQL; what an incarnation
that did not see the claim went on to write is ignored by restores; a
restore after an incarnation that may still run starts a new timeline.

Real parts: ``agent init`` clusters, ``agent serve`` processes (with
``pg_receivewal``), a ``file://`` store (fencing is store-agnostic: the
S3 store runs the same code), restores that replay the archived WAL.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from jobmesh.agent.fence import Fenced, claim, claimed
from jobmesh.agent.manifest import Manifest, snapshot_ids_with_manifest, snapshot_manifest_key
from jobmesh.agent.postgres import Instance, free_port, give_to_postgres
from jobmesh.agent.restore import restore
from jobmesh.agent.store import Store, get_bytes
from tests.support.machine import Machine, astatus, machines, post, streamed_past
from tests.support.stores import StoreSpec
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(240)

FLAGS = ("--base-backup-interval", "3600", "--wal-window", "0.5")


@pytest.fixture
def others() -> Iterator[list[Machine]]:
    """Machines made with ``beside``: stopped at the end, even when the test fails."""
    made: list[Machine] = []
    yield made
    for m in made:
        m.stop()


@pytest.fixture
def make(request: pytest.FixtureRequest, pg_root: Path, file_store: StoreSpec,
         others: list[Machine]) -> Iterator[Any]:
    with machines(pg_root, file_store, request.node) as make:
        make.others = others  # type: ignore[attr-defined]
        yield make


@pytest.fixture
async def store(file_store: StoreSpec) -> Any:
    s = file_store.open()
    yield s
    await s.close()


async def backed_up(agent: Any, timeline: int = 1) -> dict[str, Any]:
    async def there() -> dict[str, Any]:
        base = (await astatus(agent))["last_base_backup"]
        return base if base and base["timeline"] == timeline else {}

    return await until(there, f"a base backup on timeline {timeline}")


async def manifests(store: Store, job: str) -> dict[str, Manifest]:
    ids = snapshot_ids_with_manifest([o.key for o in await store.list(f"{job}/snapshots/")],
                                     job)
    return {sid: Manifest.from_json(await get_bytes(store, snapshot_manifest_key(job, sid)))
            for sid in ids}


def beside(make: Any, m: Machine, name: str) -> Machine:
    """Another machine for the same job: its own PGDATA and spool (a replacement pod)."""
    base = m.base.with_name(f"{m.base.name}-{name}")
    base.mkdir()
    (base / "spool").mkdir()
    for p in (base, base / "spool"):
        give_to_postgres(p)
    settings = {"basic_archive.archive_directory": str(base / "spool")}
    other = Machine(m.job, base, m.spec, Instance(base / "pgdata", port=free_port(),
                                                  settings=settings))
    make.others.append(other)
    return other


async def start_restored(m: Machine) -> asyncpg.Connection:
    m.inst.start(timeout=300)
    conn = await m.connect()

    async def promoted() -> bool:
        return not await conn.fetchval("select pg_is_in_recovery()")

    await until(promoted, "recovery to finish", timeout=300)
    return conn


async def test_a_newer_claim_stops_the_agent_and_its_postgres(make: Any, store: Store,
                                                              file_store: StoreSpec) -> None:
    m = make("fenced")
    agent = m.start_agent(*FLAGS, "--generation", "1", "--fence-interval", "0.2")
    await backed_up(agent)
    assert await claimed(store, m.job) == [1]
    conn = await m.connect()
    await conn.execute("create table t (n int)")
    before = set(await manifests(store, m.job))

    async def write() -> int:
        n = 0
        try:
            while True:
                await conn.execute("insert into t values ($1)", n)
                n += 1
                await asyncio.sleep(0.02)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return n  # the fenced server went away under the writer

    writer = asyncio.create_task(write())
    await asyncio.sleep(1)  # streaming: the agent uploads, and so looks at the claims
    await claim(store, m.job, 2)  # a newer incarnation, elsewhere
    code = await asyncio.to_thread(agent.proc.wait, 60)
    written = await asyncio.wait_for(writer, 60)
    conn.terminate()
    assert code == 3, agent.log_lines()[-20:]
    await asyncio.to_thread(agent.wait_for_log, "fenced off: generation 2 has claimed")
    assert written > 0  # and no more commits it could not keep:
    await until(lambda: asyncio.to_thread(lambda: not m.inst.is_running()),
                "the fenced-off PostgreSQL to be down")
    assert set(await manifests(store, m.job)) == before  # nothing counts that it sent after

    # Started again with its old generation, it refuses in seconds, in one line.
    t0 = time.monotonic()
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
                         "--pgdata", str(m.pgdata), "--spool", str(m.spool),
                         *file_store.cli_args(m.job), "--listen", "127.0.0.1:0",
                         "--generation", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "generation 1 is fenced off" in lines[0], proc.stderr
    with pytest.raises(Fenced):
        await restore(m.base / "again", store, m.job, generation=1)


async def test_a_restore_ignores_what_an_incarnation_that_went_on_wrote(
        make: Any, store: Store) -> None:
    old = make("split")
    # An agent that does not see the newer claim (one from before generations, or one
    # between its last look and its manifest): the worst a fenced-off one can do.
    zombie = old.start_agent(*FLAGS)
    await backed_up(zombie)
    conn = await old.connect()
    await conn.execute("create table t (who text, n int);"
                       " insert into t select 'before', generate_series(1, 100)")
    await streamed_past(zombie, await conn.fetchval("select pg_current_wal_lsn()::text"))

    # The controller believes the old machine lost: generation 2 restores elsewhere.
    new = beside(make, old, "new")
    result = await restore(new.pgdata, store, new.job, generation=2)
    assert result.recovery_configured
    new_conn = await start_restored(new)
    await new_conn.execute("insert into t select 'new', generate_series(1, 50)")
    agent = new.start_agent(*FLAGS, "--generation", "2")
    new_base = await backed_up(agent, timeline=2)
    await streamed_past(agent, await new_conn.fetchval("select pg_current_wal_lsn()::text"))
    await new_conn.close()

    # Meanwhile the old incarnation goes on, and stores a base backup after the new one's.
    await conn.execute("insert into t select 'zombie', generate_series(1, 70)")
    await conn.close()
    code, stale = await asyncio.to_thread(post, zombie, "/base-backup")
    assert code == 200 and stale["timeline"] == 1, stale
    assert max(await manifests(store, old.job)) == stale["id"]  # the newest snapshot

    new.lose()  # and now the new one is lost too: generation 3 restores
    final = beside(make, old, "final")
    result = await restore(final.pgdata, store, final.job, generation=3)
    assert result.manifest.id == new_base["id"], result
    assert [sid for sid, _ in result.skipped] == [stale["id"]]
    assert "past" in result.skipped[0][1]
    conn = await start_restored(final)
    try:
        rows = dict(await conn.fetch("select who, count(*) from t group by who"))
    finally:
        await conn.close()
    assert rows == {"before": 100, "new": 50}
    with pytest.raises(Fenced):
        await restore(old.base / "stale", store, old.job, generation=2)


async def test_a_restore_after_an_incarnation_that_may_still_run_starts_a_new_timeline(
        make: Any, store: Store) -> None:
    m = make("wakes")
    agent = m.start_agent(*FLAGS, "--generation", "1")
    await backed_up(agent)
    code, paused = await asyncio.to_thread(post, agent, "/pause")
    assert code == 200 and paused["generation"] == 1, paused
    agent.stop()

    # A wake from the pause: the pausing incarnation was the last, so nothing replays.
    woken = beside(make, m, "woken")
    result = await restore(woken.pgdata, store, m.job, generation=2)
    assert not result.recovery_configured
    # Generation 2 ran from that snapshot and is not known to have stopped: the next
    # restore of the same snapshot must not write WAL under the names it may be writing.
    again = beside(make, m, "again")
    result = await restore(again.pgdata, store, m.job, generation=3)
    assert result.manifest.id == paused["id"] and result.recovery_configured
    conn = await start_restored(again)
    try:
        wal = await conn.fetchval("select pg_walfile_name(pg_current_wal_lsn())")
    finally:
        await conn.close()
    assert int(wal[:8], 16) == 2  # a new timeline: WAL names no survivor can be writing
    assert os.listdir(woken.pgdata)  # untouched by the later restore
