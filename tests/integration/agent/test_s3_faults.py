"""The agent's S3 paths survive a faulty S3: 5xx answers, dropped connections, slow answers.

Every test talks to moto through ``FaultProxy``, which breaks about one
request in five (seeded), and asserts the proxy really did break some of
them, so none of these can pass by luck of a quiet network.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

import jobmesh.agent.store.s3 as store_s3
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.postgres import Instance, free_port, give_to_postgres
from jobmesh.agent.snapshot import take_snapshot
from jobmesh.agent.store import StoreError, put_bytes
from jobmesh.agent.store.s3 import PART_SIZE, S3Store
from jobmesh.agent.wal import fetch_segment, push_segment
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(600)
RATE = 0.2
BIG = 100 << 20


@pytest.fixture
def make_proxy(s3_server) -> Iterator[Callable[..., FaultProxy]]:
    """Fault proxies in front of moto (20% faults, short delays); all stopped at the end."""
    proxies: list[FaultProxy] = []

    def make(**kw) -> FaultProxy:
        proxy = FaultProxy(s3_server.endpoint, **{"rate": RATE, "delay": 0.2, **kw})
        proxies.append(proxy)
        return proxy.start()

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.create_bucket(f"faults-{os.urandom(4).hex()}")


async def pseudo_random(size: int, seed: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """``size`` incompressible bytes in 1 MiB chunks, hashed into ``digest`` as they go."""
    rng = random.Random(seed)
    left = size
    while left:
        chunk = rng.randbytes(min(left, 1 << 20))
        digest.update(chunk)
        left -= len(chunk)
        yield chunk


async def sha256_of(chunks: AsyncIterator[bytes]) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    async for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# --- the S3 store itself ------------------------------------------------------------------


async def test_large_multipart_object_round_trips_through_faults(make_proxy, bucket) -> None:
    proxy = make_proxy(seed=83)  # its first faults: a drop each way, a 500 and a 503
    store = S3Store(bucket, "big", endpoint=proxy.endpoint)
    sent = hashlib.sha256()
    try:
        stored = await store.put("object", pseudo_random(BIG, 42, sent))
        assert (stored.size, stored.sha256) == (BIG, sent.hexdigest())
        during_put = proxy.counts
        assert await sha256_of(store.get("object")) == (sent.hexdigest(), BIG)
    finally:
        await store.close()
    parts = [e for e in proxy.log if e.method == "PUT" and "partNumber=" in e.target]
    assert len({e.target for e in parts}) == -(-BIG // PART_SIZE)  # really multipart
    assert during_put["drop_request"] and during_put["drop_response"], during_put
    assert during_put["500"] + during_put["503"] > 0, during_put


async def test_download_resumes_where_a_dropped_connection_stopped(make_proxy, bucket,
                                                                   s3_server) -> None:
    direct = S3Store(bucket, "", endpoint=s3_server.endpoint)
    sent = hashlib.sha256()
    try:
        await direct.put("object", pseudo_random(64 << 20, 7, sent))
    finally:
        await direct.close()
    proxy = make_proxy(rate=0.3, kinds=("drop_response",), seed=4)
    store = S3Store(bucket, "", endpoint=proxy.endpoint)
    try:
        assert await sha256_of(store.get("object")) == (sent.hexdigest(), 64 << 20)
    finally:
        await store.close()
    assert proxy.injected("drop_response") > 0, proxy.counts
    ranges = [e.headers["range"] for e in proxy.log if "range" in e.headers]
    assert ranges and all(r.startswith("bytes=") and r != "bytes=0-" for r in ranges)


async def test_store_gives_up_with_one_clear_error_when_s3_keeps_failing(
        make_proxy, bucket, s3_server, monkeypatch) -> None:
    monkeypatch.setattr(store_s3, "ATTEMPTS", 3)
    proxy = make_proxy(rate=1.0, kinds=("503",))
    store = S3Store(bucket, "", endpoint=proxy.endpoint)
    try:
        with pytest.raises(StoreError, match="failed after 3 attempts"):
            await put_bytes(store, "never", b"x" * 1000)
    finally:
        await store.close()
    assert proxy.injected("503") >= 3
    direct = S3Store(bucket, "", endpoint=s3_server.endpoint)
    try:
        assert await direct.size("never") is None
    finally:
        await direct.close()


# --- WAL --------------------------------------------------------------------------------


JOB = "faulty"


@pytest.fixture(scope="module")
def job_server(pg_root: Path) -> Iterator[Instance]:
    """A job's PostgreSQL (``agent init``), running and archiving into its spool."""
    base = pg_root / f"fault-tests-{os.urandom(3).hex()}"  # a module fixture may be set up twice
    base.mkdir()
    init_pgdata(base / "pgdata", JOB, spool=base / "spool", archive_timeout=0)
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    inst.start()
    yield inst
    inst.stop_quietly()


async def connect(inst: Instance) -> asyncpg.Connection:
    return await asyncpg.connect(host=str(inst.socket_dir), port=inst.port, user="postgres",
                                 database=f"job_{JOB}")


async def archived_segments(inst: Instance, dest: Path, n: int) -> list[Path]:
    """``n`` real 16 MiB segments: write, switch, wait for the spool, move them to ``dest``."""
    conn = await connect(inst)
    names = []
    try:
        await conn.execute("create table if not exists filler (id bigserial, v text)")
        for _ in range(n):
            await conn.execute("insert into filler (v) select md5(g::text) "
                               "from generate_series(1, 5000) g")
            lsn = await conn.fetchval("select pg_switch_wal()")
            names.append(await conn.fetchval("select pg_walfile_name($1)", lsn))
    finally:
        await conn.close()
    spool = inst.datadir.parent / "spool"
    for _ in range(1200):
        if all((spool / name).exists() for name in names):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"Postgres never archived {names}")

    def move() -> list[Path]:
        dest.mkdir(exist_ok=True)
        return [Path(shutil.move(spool / name, dest / name)) for name in names]

    return await asyncio.to_thread(move)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_wal_segments_push_and_fetch_intact_through_faults(
        make_proxy, bucket, job_server, tmp_path) -> None:
    segments = await archived_segments(job_server, tmp_path / "spool", 8)
    proxy = make_proxy(seed=3)
    store = S3Store(bucket, "jobs", endpoint=proxy.endpoint)
    try:
        for seg in segments:
            assert await push_segment(store, JOB, seg) in ("uploaded", "exists")
        pushed_with_faults = proxy.injected()
        for seg in segments:
            await fetch_segment(store, JOB, seg.name, tmp_path / f"fetched-{seg.name}")
    finally:
        await store.close()
    for seg in segments:
        assert sha(tmp_path / f"fetched-{seg.name}") == sha(seg)
    assert pushed_with_faults > 0, proxy.counts
    assert proxy.injected() > pushed_with_faults, proxy.counts  # fetches met faults too


# --- snapshot and restore -----------------------------------------------------------------


TABLES = ("random_blobs", "texts", "numbers")


def fill(inst: Instance) -> None:
    """About 48 MB of incompressible rows (so the snapshot is dozens of objects) and some
    ordinary tables."""
    db = f"job_{JOB}"
    inst.psql("create table random_blobs (id int primary key, b bytea);"
              "alter table random_blobs alter column b set storage external;"
              "insert into random_blobs select g, (select string_agg(uuid_send("
              "gen_random_uuid()), '') from generate_series(1, 128) where g > 0) "
              "from generate_series(1, 24000) g", database=db)
    inst.psql("create table texts (id int primary key, t text);"
              "insert into texts select g, repeat(md5(g::text), 1 + g % 20) "
              "from generate_series(1, 50000) g", database=db)
    inst.psql("create table numbers (id bigint primary key, x float8, n numeric);"
              "insert into numbers select g, random(), g * 1.5 from generate_series(1, 200000) g",
              database=db)


def checksums(inst: Instance) -> dict[str, str]:
    return {t: inst.psql(f"select count(*) || ':' || md5(string_agg(x::text, ',' order by id))"
                         f" from {t} x", database=f"job_{JOB}") for t in TABLES}


async def test_snapshot_and_restore_through_faults_give_identical_data(
        make_proxy, bucket, pg_root, tmp_path) -> None:
    restore = pytest.importorskip("jobmesh.agent.restore").restore
    base = pg_root / f"snap-{os.urandom(3).hex()}"
    base.mkdir()
    give_to_postgres(base)
    source = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    init_pgdata(source.datadir, JOB, spool=base / "spool", archive_timeout=0)
    restored = Instance(base / "restored", port=free_port(), settings={"fsync": "off"})
    try:
        source.start()
        fill(source)
        before = checksums(source)
        source.stop("fast")

        snap_proxy = make_proxy(seed=2)
        store = S3Store(bucket, "jobs", endpoint=snap_proxy.endpoint)
        try:
            manifest = await take_snapshot(source.datadir, store, JOB)
        finally:
            await store.close()
        # ~48 MB of incompressible rows: dozens of objects, each uploaded through the faults
        assert manifest.extra["new_objects"] > 40, manifest.extra
        assert snap_proxy.injected() > 0, snap_proxy.counts

        # The restore's object downloads meet faults, among them one cut mid-body and
        # resumed (a ranged GET).
        restore_proxy = make_proxy(seed=41)
        store = S3Store(bucket, "jobs", endpoint=restore_proxy.endpoint)
        try:
            await restore(restored.datadir, store, JOB)
        finally:
            await store.close()
        assert restore_proxy.injected() > 0, restore_proxy.counts
        assert restore_proxy.injected("drop_response") > 0, restore_proxy.counts
        assert any("range" in e.headers for e in restore_proxy.log), restore_proxy.log

        give_to_postgres(restored.datadir)
        restored.start()
        assert checksums(restored) == before
    finally:
        restored.stop_quietly()
        source.stop_quietly()
