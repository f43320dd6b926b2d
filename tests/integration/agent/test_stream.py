"""Durability of a running job: streamed WAL, base backups per timeline, retention.

What a lost machine loses is bounded by the WAL window, an idle job costs
nothing, a pause ships everything, and a job restored from the store again
and again gets a base backup on each new timeline, so no restore replays
more than one incarnation's WAL, while retention keeps two base backups.

Everything is real: ``agent init`` clusters, ``agent serve`` as a process
(running ``pg_receivewal``), a ``file://`` store and moto's S3 server, the
postmaster, its children and the agent killed with SIGKILL under a writer
that commits a row every ~100 ms, PGDATA and the spool deleted, and a
restore that replays the archived and the streamed WAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from jobmesh.agent.inventory import read_listing, wal_name
from jobmesh.agent.postgres import Instance, free_port, give_to_postgres
from jobmesh.agent.restore import restore
from jobmesh.agent.store import Store
from jobmesh.agent.walnames import is_segment, parse_lsn, parse_segment
from jobmesh.agent.walpartial import parse_delta_key, partial_prefix
from jobmesh.defaults import WAL_WINDOW
from tests.support.machine import Machine, astatus, machines, post, streamed_past
from tests.support.process import LoggedProcess
from tests.support.stores import StoreSpec
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def machine(request: pytest.FixtureRequest, pg_root: Path,
            store_spec: StoreSpec) -> Iterator[Callable[..., Machine]]:
    with machines(pg_root, store_spec, request.node) as make:
        yield make


class Writer:
    """Commits a row every ~100 ms; a ledger of (time acknowledged, row number)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.acknowledged: list[tuple[float, int]] = []
        self.task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        n = 0
        with contextlib.suppress(Exception):  # the server dies under us: that is the point
            while True:
                await self.conn.execute("insert into t (n) values ($1)", n + 1)
                n += 1
                self.acknowledged.append((time.time(), n))
                await asyncio.sleep(0.1)

    async def stopped(self) -> None:
        await asyncio.wait_for(self.task, 60)
        self.conn.terminate()


async def restored_rows(m: Machine, store: Store) -> list[int]:
    """Restore the job from the store into its (deleted) PGDATA, start it, read ``t``."""
    result = await restore(m.pgdata, store, m.job)
    assert result.recovery_configured
    inst = Instance(m.pgdata, port=free_port(), settings={"archive_mode": "off"})
    m.inst = inst
    inst.start(timeout=300)
    conn = await m.connect()
    try:
        async def promoted() -> bool:
            return not await conn.fetchval("select pg_is_in_recovery()")

        await until(promoted, "recovery to finish", timeout=300)
        return [r[0] for r in await conn.fetch("select n from t order by n")]
    finally:
        await conn.close()


async def delta_count(store: Store, job: str) -> int:
    return sum(1 for o in await store.list(partial_prefix(job))
               if parse_delta_key(job, o.key) is not None)


async def crash_under_writes(m: Machine, store: Store, window: float) -> tuple[float, Writer]:
    """Write, wait until a delta went up, crash about 0.8 window later (the tail at risk
    at its largest), lose the machine; returns the kill time and the writer's ledger."""
    agent = m.agents[-1]

    async def backed_up() -> bool:
        return (await astatus(agent))["last_base_backup"] is not None

    await until(backed_up, "the first base backup")
    conn = await m.connect()
    await conn.execute("create table t (n bigint primary key)")
    writer = Writer(conn)
    if window > 0:
        async def streamed(after: int) -> bool:
            return (await astatus(agent))["stream"]["deltas_uploaded"] > after

        first = (await astatus(agent))["stream"]["deltas_uploaded"]
        await until(lambda: streamed(first), "a delta of the rows")
        uploaded_at = time.time()
        await until(lambda: streamed(first + 1), "another delta")
        uploaded_at = time.time()
        await until(lambda: writer.acknowledged[-1][0] >= uploaded_at + 0.8 * window,
                    "the writer to go on past the last upload")
    else:
        await until(lambda: len(writer.acknowledged) >= 50, "50 commits")
    killed_at = m.lose()
    await writer.stopped()
    return killed_at, writer


def check_loss(rows: list[int], writer: Writer, killed_at: float, bound: float,
               what: str) -> None:
    assert rows == list(range(1, len(rows) + 1)), "holes in the restored rows"
    highest = rows[-1] if rows else 0
    acked = writer.acknowledged
    assert highest <= acked[-1][1] + 1  # +1: committed, its acknowledgement lost in the kill
    lost = [(t, n) for t, n in acked if n > highest]
    span = killed_at - lost[0][0] if lost else 0.0
    print(f"\n{what}: {len(acked)} commits acknowledged, {highest} restored, {len(lost)} "
          f"lost (acknowledged from {span:.2f} s before the kill)")
    assert all(t >= killed_at - bound for t, _ in lost), (
        f"lost commits acknowledged {span:.2f} s before the kill (bound {bound} s)")


async def test_a_lost_machine_loses_at_most_the_wal_window(
        machine: Callable[..., Machine], store: Store) -> None:
    m = machine("streamed")
    m.start_agent("--base-backup-interval", "3600", "--wal-window", f"{WAL_WINDOW:g}")
    killed_at, writer = await crash_under_writes(m, store, WAL_WINDOW)
    assert await delta_count(store, m.job) > 0
    rows = await restored_rows(m, store)
    # archive_timeout is an hour and no segment filled: only the deltas hold these rows
    assert len(rows) > 0
    check_loss(rows, writer, killed_at, WAL_WINDOW + 2.0,
               f"lost machine ({store.url.split(':')[0]})")


async def test_without_streaming_the_loss_is_bounded_by_archive_timeout(
        machine: Callable[..., Machine], store: Store, store_spec: StoreSpec) -> None:
    if store_spec.s3 is not None:
        pytest.skip("the old path is the same for both stores; the file store shows it")
    m = machine("unstreamed", archive_timeout=2)
    m.start_agent("--base-backup-interval", "3600", "--wal-window", "0")
    killed_at, writer = await crash_under_writes(m, store, 0)
    assert await delta_count(store, m.job) == 0
    rows = await restored_rows(m, store)
    check_loss(rows, writer, killed_at, 2 + 2.0, "lost machine, no streaming")


async def test_an_idle_job_uploads_no_delta(machine: Callable[..., Machine],
                                            store: Store) -> None:
    m = machine("idle")
    agent = m.start_agent("--base-backup-interval", "3600", "--wal-window", "0.5")

    seen: dict[str, int] = {}

    async def settled() -> dict[str, Any] | None:
        """The first base backup is stored and its WAL streamed, and no delta for 16 s:
        after WAL was written, the background writer logs a standby snapshot (a
        running-transactions record) within 15 s, and that is WAL too."""
        s = await astatus(agent)
        stream = s["stream"]
        if not s["last_base_backup"] or seen.get("deltas") != stream["deltas_uploaded"]:
            seen.update(deltas=stream["deltas_uploaded"], rounds=stream["rounds"])
            return None
        return s if stream["rounds"] >= seen["rounds"] + 32 else None  # 0.5 s windows

    before = await until(settled, "the first base backup and its WAL to be shipped")
    objects = {o.key for o in await store.list(f"{m.job}/")}
    rounds = before["stream"]["rounds"]

    async def windows_passed() -> dict[str, Any] | None:
        s = await astatus(agent)
        return s if s["stream"]["rounds"] >= rounds + 8 else None

    after = await until(windows_passed, "eight more windows")
    assert after["stream"]["deltas_uploaded"] == before["stream"]["deltas_uploaded"]
    assert {o.key for o in await store.list(f"{m.job}/")} == objects


async def test_a_pause_ships_the_streamed_tail_and_a_resumed_job_streams_again(
        machine: Callable[..., Machine], store: Store) -> None:
    m = machine("paused")
    agent = m.start_agent("--base-backup-interval", "3600", "--wal-window", "1")

    async def backed_up() -> bool:
        return (await astatus(agent))["last_base_backup"] is not None

    await until(backed_up, "the first base backup")
    conn = await m.connect()
    await conn.execute("create table t (n bigint primary key);"
                       " insert into t select generate_series(1, 10)")
    await conn.close()
    code, paused = await asyncio.to_thread(post, agent, "/pause")
    assert code == 200 and paused["kind"] == "pause", paused
    # the snapshot's pg_wal holds the unfinished segment; its deltas stay (the agent
    # never deletes) and say where the stream stood, as the manifest does
    assert await delta_count(store, m.job) > 0
    assert paused["extra"]["streamed_to"]
    assert (await astatus(agent))["stream"]["receiver_pid"] is None

    m.inst.start()  # resume on the same PGDATA, under the same agent
    conn = await m.connect()
    await conn.execute("insert into t select generate_series(11, 20)")
    lsn = await conn.fetchval("select pg_current_wal_lsn()::text")
    await conn.close()
    await streamed_past(agent, lsn)
    m.lose()
    assert await restored_rows(m, store) == list(range(1, 21))


def _replayed(log: str) -> int:
    """Bytes of WAL a start replayed, from its ``redo starts at``/``redo done at`` lines."""
    start = done = None
    for line in log.splitlines():
        if "redo starts at " in line:
            start = parse_lsn(line.split("redo starts at ")[1].split()[0])
        if "redo done at " in line:
            done = parse_lsn(line.split("redo done at ")[1].split()[0])
    assert start is not None and done is not None, log[-2000:]
    return done - start


async def test_each_recovery_gets_a_base_backup_on_its_timeline_and_retention_keeps_two(
        machine: Callable[..., Machine], store: Store) -> None:
    m = machine("reborn")
    flags = ("--base-backup-interval", "3600", "--wal-window", "1")
    agent = m.start_agent(*flags)
    replayed: list[tuple[int, int, int]] = []  # (timeline, WAL written, WAL replayed)
    created = False
    for timeline in range(1, 5):  # three recoveries from the store
        async def backed_up(tli: int = timeline, a: LoggedProcess = agent) -> dict[str, Any]:
            base = (await astatus(a))["last_base_backup"]
            return base if base and base["timeline"] == tli else {}

        base = await until(backed_up, f"a base backup on timeline {timeline}")
        conn = await m.connect()
        if not created:
            await conn.execute("create table big (n int, v text)")
            created = True
        await conn.execute("insert into big select g, repeat(md5(g::text), 30)"
                           " from generate_series(1, 15000) g")
        lsn = await conn.fetchval("select pg_current_wal_lsn()::text")
        await conn.close()
        written = parse_lsn(lsn) - parse_lsn(base["start_lsn"])
        await streamed_past(agent, lsn)
        if timeline == 4:
            break
        m.lose()
        m.spool.mkdir()  # the replacement machine: same paths, nothing on them
        give_to_postgres(m.spool)
        result = await restore(m.pgdata, store, m.job)
        assert (result.manifest.id, result.manifest.timeline) == (base["id"], timeline)
        log_from = m.inst.logfile.stat().st_size if m.inst.logfile.exists() else 0
        m.inst = Instance(m.pgdata, port=free_port())
        m.inst.start(timeout=300)
        conn = await m.connect()
        try:
            async def promoted(c: asyncpg.Connection = conn) -> bool:
                return not await c.fetchval("select pg_is_in_recovery()")

            await until(promoted, "recovery to finish", timeout=300)
            assert await conn.fetchval("select count(*) from big") == 15000 * timeline
        finally:
            await conn.close()
        with m.inst.logfile.open() as f:
            f.seek(log_from)
            replayed.append((timeline, written, _replayed(f.read())))
        agent = m.start_agent(*flags)
        agent.wait_for_log(rf"base backup due: timeline {timeline + 1} has no base backup",
                           timeout=60)
    print("\nrecoveries (timeline lost, WAL written since its base backup, WAL replayed): "
          + "; ".join(f"tli {t}: {w / 2**20:.1f} MiB written, {r / 2**20:.1f} MiB replayed"
                      for t, w, r in replayed))
    for _, w, r in replayed:  # one incarnation's WAL, never the whole history
        assert r <= w + 2**20

    async def retained() -> Any:
        listing = await read_listing(store, m.job)
        bases = [b for b in listing.snapshots.values() if b.kind == "base"]
        return listing if len(bases) == 2 else None

    listing = await until(retained, "retention to leave two base backups")
    bases = [b for b in listing.snapshots.values() if b.kind == "base"]
    assert [b.timeline for b in bases] == [3, 4]
    oldest = parse_segment(bases[0].start_wal).number
    positions = []
    for key in listing.objects:
        if not key.startswith(f"{m.job}/wal/") or "/wal/history/" in key:
            continue
        delta = parse_delta_key(m.job, key)
        name = delta.segment if delta else wal_name(key)[:24]
        assert is_segment(name), key
        positions.append((parse_segment(name).number, key))
    assert positions and min(positions)[0] >= oldest, min(positions)
    histories = [k for k in listing.objects if "/wal/history/" in k]
    assert len(histories) == 3  # timelines 2, 3 and 4


async def test_so_much_wal_since_the_last_base_backup_makes_a_new_one(
        machine: Callable[..., Machine], store: Store, store_spec: StoreSpec) -> None:
    if store_spec.s3 is not None:
        pytest.skip("a schedule, not a store feature: the file store shows it")
    m = machine("volume")
    agent = m.start_agent("--base-backup-interval", "3600", "--wal-window", "1",
                          "--base-backup-wal-bytes", str(16 * 2**20))

    async def base_id() -> str | None:
        base = (await astatus(agent))["last_base_backup"]
        return base["id"] if base else None

    first = await until(base_id, "the first base backup")
    conn = await m.connect()
    await conn.execute("create table big as select g as n, repeat(md5(g::text), 30) as v"
                       " from generate_series(1, 15000) g")  # ~30 MiB of WAL
    await conn.close()

    async def another() -> bool:
        return (await base_id()) not in (None, first)

    await until(another, "a base backup after 16 MiB of WAL", timeout=60)
    agent.wait_for_log(r"base backup due: \d+ MiB of WAL since base backup")
