"""Session-mode pooling: a leaving client's backend is reset (DISCARD ALL) and serves the
next client of the same job, role and startup parameters; nothing of one session reaches
the next; a backend left busy is closed, never reused."""

from __future__ import annotations

import secrets
import subprocess

import asyncpg
import psycopg
import pytest

from jobmesh.agent.postgres import bin_dir, free_port
from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml
from tests.support.waiting import until

from .test_lifecycle import scrape

pytestmark = pytest.mark.timeout(90)

IDLE = "jobmesh_router_server_connections_idle"
REUSED = ("jobmesh_router_server_connections_reused_total", ())
NOT_KEPT = ("jobmesh_router_server_connections_not_kept_total", ())


def _router(router_factory, pg, *flags: str):
    port = free_port()
    r = router_factory(routes_toml(pg), "--metrics", f"127.0.0.1:{port}", *flags)
    r.metrics_port = port
    return r


@pytest.fixture
def pooled(router_factory, pg):
    return _router(router_factory, pg)


def _connect(router, **kw) -> psycopg.Connection:
    return psycopg.connect(router.dsn(), connect_timeout=10, autocommit=True, **kw)


def _direct(pg) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                           password=SUPERUSER_PASSWORD, dbname="job_alpha", autocommit=True)


def _metric(router, key) -> float:
    return scrape(router.metrics_port).get(key, 0)


async def _idle(router, count: int) -> None:
    """Until the router keeps ``count`` idle backends of job alpha."""
    def kept() -> bool:
        return _metric(router, (IDLE, (("job", "alpha"),))) == count

    await until(kept, f"{count} idle backends kept")


async def test_a_leaving_clients_backend_serves_the_next_client(pooled):
    with _connect(pooled) as first:
        pid = first.info.backend_pid
    await _idle(pooled, 1)
    with _connect(pooled) as second:
        assert second.info.backend_pid == pid  # no fork, no login
        assert second.execute("select pg_backend_pid()").fetchone() == (pid,)
        assert second.info.parameter_status("server_version") is not None
        assert second.info.parameter_status("client_encoding") == "UTF8"
        second.execute("select 1")
    assert _metric(pooled, REUSED) == 1
    await _idle(pooled, 1)


async def test_nothing_of_a_session_reaches_the_next_client(pooled):
    lock, channel = secrets.randbelow(2**31), f"ch_{secrets.token_hex(4)}"
    with _connect(pooled) as first:
        pid = first.info.backend_pid
        first.execute("create temp table scratch (n int)")
        first.execute("set work_mem = '7MB'")
        first.execute("set application_name = 'first'")
        first.execute("prepare mine as select 41 + 1")
        first.execute("select %s::int + 1", (1,), prepare=True)  # a protocol-level statement
        first.execute("select pg_advisory_lock(%s)", (lock,))
        first.execute(f"listen {channel}")
        first.execute("declare c cursor with hold for select 1")
    await _idle(pooled, 1)
    with _connect(pooled) as second:
        assert second.info.backend_pid == pid
        q = second.execute
        assert q("select to_regclass('pg_temp.scratch')").fetchone() == (None,)
        assert q("show work_mem").fetchone() == ("4MB",)
        assert q("show application_name").fetchone() == ("",)
        assert second.info.parameter_status("application_name") == ""
        assert q("select count(*) from pg_prepared_statements").fetchone() == (0,)
        assert q("select count(*) from pg_cursors").fetchone() == (0,)
        assert q("select count(*) from pg_listening_channels()").fetchone() == (0,)
        assert q("select count(*) from pg_locks where locktype = 'advisory' and pid = %s",
                 (pid,)).fetchone() == (0,)


async def test_startup_options_pool_apart(pooled):
    with _connect(pooled, options="-c search_path=foo") as first:
        pid = first.info.backend_pid
    await _idle(pooled, 1)
    with _connect(pooled) as plain:  # another key: a backend of its own
        assert plain.info.backend_pid != pid
        assert plain.execute("show search_path").fetchone() == ('"$user", public',)
    await _idle(pooled, 2)
    with _connect(pooled, options="-c search_path=foo") as again:
        assert again.info.backend_pid == pid
        assert again.execute("show search_path").fetchone() == ("foo",)


async def test_a_backend_left_in_a_transaction_or_copy_is_closed(pooled, pg):
    table = f"gone_{secrets.token_hex(4)}"
    with _connect(pooled) as conn:
        conn.execute(f"create table {table} (n int)")
    for busy, left in ((f"begin; insert into {table} values (1)", psycopg.pq.ExecStatus.COMMAND_OK),
                       (f"copy {table} from stdin", psycopg.pq.ExecStatus.COPY_IN)):
        conn = _connect(pooled)
        pid = conn.info.backend_pid
        conn.pgconn.send_query(busy.encode())
        while conn.pgconn.flush():
            pass
        res = conn.pgconn.get_result()  # (blocks until the backend answered)
        assert res is not None and res.status == left
        conn.pgconn.finish()  # the socket closes with the transaction open, or in COPY

        async def closed(pid: int = pid) -> bool:
            with _direct(pg) as direct:
                return direct.execute("select count(*) from pg_stat_activity where pid = %s",
                                      (pid,)).fetchone() == (0,)

        await until(closed, f"the busy backend to be closed ({busy})")
    assert _metric(pooled, NOT_KEPT) == 2
    with _connect(pooled) as conn:
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)  # rolled back
        conn.execute(f"drop table {table}")


async def test_the_pool_keeps_at_most_its_size_and_closes_idle_ones_in_time(router_factory,
                                                                            pg):
    r = _router(router_factory, pg, "--pool-size", "2", "--server-idle-timeout", "1")
    conns = [_connect(r) for _ in range(3)]
    pids = [c.info.backend_pid for c in conns]
    for c in conns:
        c.close()
    await _idle(r, 2)
    await _idle(r, 0)  # a second unused: closed

    async def gone() -> bool:
        with _direct(pg) as direct:
            return direct.execute("select count(*) from pg_stat_activity where pid = any(%s)",
                                  (pids,)).fetchone() == (0,)

    await until(gone, "the idle backends to end")


async def test_asyncpgs_statement_cache_meets_a_reused_backend(pooled):
    for _ in range(3):
        conn = await asyncpg.connect(host="127.0.0.1", port=pooled.port, user="alice",
                                     password="s3cret", database="job_alpha", timeout=10)
        try:
            for i in range(5):  # the same statement names every round: deallocated between
                assert await conn.fetchval("select $1::int * 2", i) == i * 2
        finally:
            await conn.close()
        await _idle(pooled, 1)
    assert _metric(pooled, REUSED) == 2


def test_pgbench_new_connection_per_transaction_is_served_from_the_pool(pooled, tmp_path):
    script = tmp_path / "one.sql"
    script.write_text("select 1;\n")
    proc = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", "-C", "-c", "2", "-t", "50", "-f", str(script),
         "-h", "127.0.0.1", "-p", str(pooled.port), "-U", "alice", "job_alpha"],
        capture_output=True, text=True, timeout=60, env={"PGPASSWORD": "s3cret"})
    assert proc.returncode == 0, proc.stderr
    assert "number of transactions actually processed: 100/100" in proc.stdout
    assert _metric(pooled, REUSED) >= 50  # most of its 100 connections took a kept backend


async def test_a_full_postgres_gives_up_kept_connections_for_a_new_client(router_factory,
                                                                          pg_factory):
    """Kept connections of other startup parameters (each application_name pools apart)
    must not lock a new client out: PostgreSQL's 53300 closes the oldest kept one."""
    small = pg_factory(f"small{secrets.token_hex(2)}", max_connections="6",
                       superuser_reserved_connections="0")
    r = _router(router_factory, small)
    pids = []
    for i in range(6):  # fill it with kept connections, each its own pool
        with _connect(r, application_name=f"app{i}") as conn:
            pids.append(conn.info.backend_pid)
        await _idle(r, i + 1)
    with _connect(r, application_name="newcomer") as conn:
        assert conn.execute("show application_name").fetchone() == ("newcomer",)
        assert conn.info.backend_pid not in pids
    await _idle(r, 6)  # one kept connection gave way; the newcomer's is kept now
    with _connect(r, application_name="app1") as conn:
        assert conn.info.backend_pid == pids[1]  # the others were left alone
