"""Real clients through the router against a real PostgreSQL 15.

psql, pgbench, psycopg 3 and asyncpg each drive the router the way
applications do: simple and extended protocol, pipelining, COPY both ways,
portals, LISTEN/NOTIFY, CancelRequest, and startup parameters. Nothing
here sleeps to wait: every wait is on an event, a process or a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml

CONNECT_TIMEOUT = 10


def _client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, "PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT), **extra}


def _psql(dsn: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", dsn, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args],
        capture_output=True, text=True, timeout=timeout, env=_client_env(), check=False,
    )


def _direct_dsn(pg, dbname: str = "job_alpha") -> str:
    return (f"host=127.0.0.1 port={pg.port} user=postgres password={SUPERUSER_PASSWORD} "
            f"dbname={dbname} connect_timeout={CONNECT_TIMEOUT}")


def _connect(router, **kwargs) -> psycopg.Connection:
    return psycopg.connect(router.dsn(), connect_timeout=CONNECT_TIMEOUT, **kwargs)


def _table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


# --- psql --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_psql_runs_a_query_through_the_router(router):
    proc = _psql(router.dsn(), "-c", "select current_database(), 6 * 7")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "job_alpha|42"


@pytest.mark.timeout(60)
def test_psql_runs_a_multi_statement_script(router, tmp_path):
    t = _table()
    script = tmp_path / "script.sql"
    script.write_text(
        f"create temp table {t} (id int primary key, name text);\n"
        f"insert into {t} select g, 'n' || g from generate_series(1, 100) g;\n"
        f"update {t} set name = upper(name) where id % 10 = 0;\n"
        "begin;\n"
        f"delete from {t} where id > 90;\n"
        "commit;\n"
        f"select count(*), sum(id), count(*) filter (where name like 'N%') from {t};\n"
    )
    proc = _psql(router.dsn(), "-f", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "90|4095|9"


# --- pgbench -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_pg(pg_factory):
    """A PostgreSQL of its own for pgbench, initialised directly (not through the router)."""
    inst = pg_factory(f"bench-{uuid.uuid4().hex[:6]}", databases=("job_bench",))
    proc = subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", _direct_dsn(inst, "job_bench")],
        capture_output=True, text=True, timeout=120, env=_client_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return inst


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_runs_without_failures_through_the_router(router_factory, bench_pg, mode):
    jobs = {"bench": {"host": "127.0.0.1", "port": bench_pg.port, "user": "postgres",
                      "password": SUPERUSER_PASSWORD}}
    r = router_factory(routes_toml(bench_pg, jobs=jobs, users={"alice": ("s3cret", ["bench"])}))
    env = _client_env(PGHOST="127.0.0.1", PGPORT=str(r.port), PGUSER="alice",
                      PGPASSWORD="s3cret", PGDATABASE="job_bench")
    proc = subprocess.run(
        ["pgbench", "-n", "-T", "2", "-c", "4", "-j", "2", "-M", mode],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed and int(processed.group(1)) > 0, out
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed and int(failed.group(1)) == 0, out
    assert "aborted" not in out.lower(), out
    print(f"pgbench -M {mode}: {processed.group(1)} transactions")


# --- psycopg 3 ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_psycopg_pipeline_mode_returns_every_result_in_order(router):
    t = _table()
    with _connect(router, autocommit=True) as conn:
        conn.execute(f"create temp table {t} (id int, v text)")
        with conn.pipeline():
            ins = [conn.execute(f"insert into {t} values (%s, %s) returning id", (i, f"v{i}"))
                   for i in range(50)]
            cur_count = conn.execute(f"select count(*), sum(id) from {t}")
            cur_param = conn.execute("select %s::int + %s::int, %s::text", (40, 2, "x"))
        assert [c.fetchone()[0] for c in ins] == list(range(50))
        assert cur_count.fetchone() == (50, sum(range(50)))
        assert cur_param.fetchone() == (42, "x")


def _copy_rows(n: int) -> list[tuple[int, str]]:
    return [(i, f"row {i} " + "\u00e9x\\\t"[i % 4] * (i % 97)) for i in range(n)]


@pytest.mark.timeout(60)
def test_psycopg_copy_from_stdin_and_to_stdout_round_trip(router):
    rows = _copy_rows(10_000)
    expected = hashlib.sha256(repr(rows).encode()).hexdigest()
    t = _table()
    with _connect(router, autocommit=True) as conn:
        conn.execute(f"create temp table {t} (id int, payload text)")
        with conn.cursor() as cur:
            with cur.copy(f"copy {t} (id, payload) from stdin") as copy:
                for row in rows:
                    copy.write_row(row)
            assert cur.rowcount == len(rows)
            server = cur.execute(
                f"select count(*), md5(string_agg(id || ':' || payload, '|' order by id)) from {t}"
            ).fetchone()
            local_md5 = hashlib.md5("|".join(f"{i}:{p}" for i, p in rows).encode()).hexdigest()
            assert server == (len(rows), local_md5)
            got: list[tuple[int, str]] = []
            with cur.copy(f"copy (select id, payload from {t} order by id) to stdout") as copy:
                copy.set_types(["int4", "text"])
                got.extend(copy.rows())
    assert len(got) == len(rows)
    assert hashlib.sha256(repr(got).encode()).hexdigest() == expected


@pytest.mark.timeout(60)
def test_psycopg_server_side_cursor_fetches_in_batches(router):
    with _connect(router) as conn, conn.cursor(name="batches") as cur:
        cur.execute("select g, repeat('x', g % 50) from generate_series(1, 5000) g")
        seen, batches = [], 0
        while batch := cur.fetchmany(700):
            assert len(batch) <= 700
            seen.extend(r[0] for r in batch)
            batches += 1
        assert seen == list(range(1, 5001))
        assert batches == 8
        portals = conn.execute("select name from pg_cursors").fetchall()
        assert ("batches",) in portals


@pytest.mark.timeout(60)
def test_psycopg_server_side_cursor_iterates_with_itersize(router):
    with _connect(router) as conn, conn.cursor(name="iter") as cur:
        cur.itersize = 333
        cur.execute("select g from generate_series(1, 2000) g")
        assert [r[0] for r in cur] == list(range(1, 2001))


@pytest.mark.timeout(60)
def test_listen_notify_between_two_router_connections(router):
    channel = f"ch_{uuid.uuid4().hex[:8]}"
    with _connect(router, autocommit=True) as listener, \
            _connect(router, autocommit=True) as notifier:
        listener.execute(f"listen {channel}")
        notifier_pid = notifier.execute("select pg_backend_pid()").fetchone()[0]
        notifier.execute("select pg_notify(%s, %s)", (channel, "hello via router"))
        got = list(listener.notifies(timeout=10, stop_after=1))
    assert len(got) == 1, "no notification within 10 s"
    assert (got[0].channel, got[0].payload, got[0].pid) == (
        channel, "hello via router", notifier_pid)


def _wait_until_sleeping(pg, backend_pid: int, worker: threading.Thread, deadline: float) -> None:
    """Wait until the backend is inside pg_sleep, watching from a direct connection."""
    with psycopg.connect(_direct_dsn(pg), autocommit=True) as mon:
        while True:
            mon.execute("select pg_stat_clear_snapshot()")
            row = mon.execute(
                "select 1 from pg_stat_activity where pid = %s and wait_event = 'PgSleep'",
                (backend_pid,),
            ).fetchone()
            if row:
                return
            worker.join(timeout=0.02)  # an event wait: returns at once if the query ended
            assert worker.is_alive(), "the query ended before it could be cancelled"
            assert time.monotonic() < deadline, "the query never started sleeping"


def _run_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # reported to the test thread
            out["error"] = exc
        out["ended"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


@pytest.mark.timeout(60)
def test_psycopg_cancel_interrupts_pg_sleep(router, pg, record_property):
    with _connect(router, autocommit=True) as conn:
        backend_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        worker, out = _run_in_thread(lambda: conn.execute("select pg_sleep(30)"))
        _wait_until_sleeping(pg, backend_pid, worker, time.monotonic() + 20)
        started = time.monotonic()
        conn.cancel_safe(timeout=10)
        worker.join(timeout=20)
        assert not worker.is_alive(), "pg_sleep(30) was not cancelled within 20 s"
        elapsed = out["ended"] - started
        record_property("cancel_latency_s", f"{elapsed:.3f}")
        print(f"psycopg cancel latency through the router: {elapsed * 1000:.1f} ms")
        assert isinstance(out.get("error"), pgerrors.QueryCanceled), out
        assert elapsed < 10
        assert conn.execute("select 1").fetchone() == (1,)


# --- startup parameters ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("param", "value", "setting", "expected"),
    [
        ("application_name", "jobmesh-it", "application_name", "jobmesh-it"),
        ("options", "-c search_path=foo", "search_path", "foo"),
        ("client_encoding", "LATIN1", "client_encoding", "LATIN1"),
        ("options", "-c statement_timeout=4321", "statement_timeout", "4321ms"),
    ],
)
def test_startup_parameter_reaches_the_backend(router, param, value, setting, expected):
    with _connect(router, **{param: value}) as conn:
        assert conn.execute(f"show {setting}").fetchone() == (expected,)
        if param != "options":  # reported to the client as ParameterStatus too
            assert conn.info.parameter_status(setting) == expected


# --- asyncpg ---------------------------------------------------------------------


async def _aconnect(router, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=router.port, user="alice",
                                 password="s3cret", database="job_alpha", timeout=10, **kwargs)


@pytest.mark.timeout(60)
async def test_asyncpg_prepared_statement_runs_repeatedly_with_params(router):
    conn = await _aconnect(router)
    try:
        stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text || '!' as shout")
        assert [a.name for a in stmt.get_attributes()] == ["doubled", "shout"]
        for i in range(200):
            row = await stmt.fetchrow(i, f"n{i}")
            assert (row["doubled"], row["shout"]) == (i * 2, f"n{i}!")
        rows = await stmt.fetch(21, "x")
        assert [tuple(r) for r in rows] == [(42, "x!")]
    finally:
        await conn.close()


@pytest.mark.timeout(60)
async def test_asyncpg_binary_copy_round_trip(router):
    src, dst = _table(), _table()
    records = [(i, f"name {i}", bytes([i % 256]) * (i % 40), i * 1.5) for i in range(10_000)]
    conn = await _aconnect(router)
    try:
        for t in (src, dst):
            await conn.execute(f"create temp table {t} (id int, name text, blob bytea, f float8)")
        status = await conn.copy_records_to_table(src, records=records)
        assert status == "COPY 10000"
        buf = io.BytesIO()
        await conn.copy_from_query(f"select * from {src} order by id", output=buf,
                                   format="binary")
        buf.seek(0)
        assert await conn.copy_to_table(dst, source=buf, format="binary") == "COPY 10000"
        table_buf = io.BytesIO()
        await conn.copy_from_table(dst, output=table_buf, format="binary")
        assert len(table_buf.getvalue()) == len(buf.getvalue())
        got = await conn.fetch(f"select * from {dst} order by id")
        assert [tuple(r) for r in got] == records
    finally:
        await conn.close()


@pytest.mark.timeout(60)
async def test_asyncpg_timeout_cancels_the_query_and_connection_stays_usable(router,
                                                                          record_property):
    conn = await _aconnect(router)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetch("select pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("select 40 + 2", timeout=15) == 42
        elapsed = time.monotonic() - started
        record_property("asyncpg_timeout_cancel_s", f"{elapsed:.3f}")
        print(f"asyncpg timeout+cancel+next query: {elapsed * 1000:.1f} ms")
        assert elapsed < 10, "the backend kept sleeping: the cancel did not reach it"
        assert await conn.fetchval("select count(*) from pg_stat_activity "
                                   "where query = 'select pg_sleep(30)' "
                                   "and state = 'active'") == 0
    finally:
        await asyncio.wait_for(conn.close(), 10)
