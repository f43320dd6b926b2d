"""Transaction pooling: clients share a job's pool_size backends, one per transaction;
named prepared statements follow a client from backend to backend; what needs a session
is refused with 0A000; a client waits for a busy pool (NOTICE, then 53300)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from jobmesh.agent.postgres import bin_dir
from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml
from tests.support.waiting import until
from tests.support.wire import WireClient, read_message

pytestmark = pytest.mark.timeout(90)


def _tx_router(router_factory, pg, size: int = 2, *flags: str):
    jobs = {"alpha": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                      "password": SUPERUSER_PASSWORD, "pool_mode": "transaction",
                      "pool_size": size}}
    return router_factory(routes_toml(pg, jobs=jobs), *flags)


@pytest.fixture
def tx(router_factory, pg):
    return _tx_router(router_factory, pg, 2)


@pytest.fixture
def tx1(router_factory, pg):
    """One backend for every client, and a short wait."""
    return _tx_router(router_factory, pg, 1, "--query-wait-notify", "0.3",
                      "--query-wait-timeout", "3")


def _connect(router, **kw) -> psycopg.Connection:
    return psycopg.connect(router.dsn(), connect_timeout=10, autocommit=True, **kw)


async def _aconnect(router, **kw) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=router.port, user="alice",
                                 password="s3cret", database="job_alpha", timeout=10, **kw)


def test_clients_share_one_backend_a_transaction_at_a_time(tx1):
    with _connect(tx1) as a, _connect(tx1) as b:
        pid = a.execute("select pg_backend_pid()").fetchone()[0]
        assert b.execute("select pg_backend_pid()").fetchone()[0] == pid
        assert a.info.backend_pid != pid  # no backend of its own: the router's key
        with a.transaction():
            a.execute("create temp table t (n int) on commit drop")
            a.execute("insert into t values (1)")
            assert a.execute("select count(*) from t").fetchone() == (1,)
        assert b.execute("select 2").fetchone() == (2,)
        assert a.info.parameter_status("server_version")


def test_named_prepared_statements_follow_a_client_across_backends(tx):
    # prepare_threshold=0: psycopg prepares every query under a name (_pg3_0, ...), the same
    # names in every connection; with two backends and three clients each lands anywhere.
    conns = [_connect(tx, prepare_threshold=0) for _ in range(3)]
    try:
        for round_ in range(20):
            for i, conn in enumerate(conns):
                assert conn.execute("select %s::int + %s::int", (i, round_)).fetchone() == (
                    i + round_,)
                assert conn.execute("select %s::text || 'x'", (str(i),)).fetchone() == (
                    f"{i}x",)
                if round_ % 5 == 0:
                    with conn.transaction():
                        assert conn.execute("select %s::int * 2", (i,)).fetchone() == (2 * i,)
    finally:
        for conn in conns:
            conn.close()


async def test_asyncpgs_statement_cache_works_in_transaction_mode(tx):
    conns = [await _aconnect(tx) for _ in range(4)]
    try:
        async def work(conn: asyncpg.Connection, n: int) -> None:
            for i in range(30):
                assert await conn.fetchval("select $1::int + $2::int", n, i) == n + i
                row = await conn.fetchrow("select $1::text as a, $2::int as b", str(i), n)
                assert (row["a"], row["b"]) == (str(i), n)
                async with conn.transaction():
                    assert await conn.fetchval("select $1::int * 3", i) == 3 * i
                if i % 10 == 0:
                    with pytest.raises(asyncpg.DivisionByZeroError):
                        await conn.fetchval("select 1 / $1::int", 0)
        await asyncio.gather(*(work(c, n) for n, c in enumerate(conns)))
        stmt = await conns[0].prepare("select $1::int - 1")
        assert await stmt.fetchval(5) == 4
        assert await stmt.fetchval(9) == 8
    finally:
        for c in conns:
            await c.close()


def test_pgbench_prepared_through_transaction_mode(tx, pg, tmp_path):
    env = {"PGPASSWORD": SUPERUSER_PASSWORD, "PATH": "/usr/bin:/bin"}
    subprocess.run([str(bin_dir() / "pgbench"), "-i", "-s", "1", "-q", "-h", "127.0.0.1",
                    "-p", str(pg.port), "-U", "postgres", "job_alpha"],
                   check=True, env=env, capture_output=True, timeout=60)
    env["PGPASSWORD"] = "s3cret"
    out = subprocess.run(
        [str(bin_dir() / "pgbench"), "-n", "-S", "-M", "prepared", "-c", "8", "-j", "2",
         "-t", "200", "-h", "127.0.0.1", "-p", str(tx.port), "-U", "alice", "job_alpha"],
        env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "number of transactions actually processed: 1600/1600" in out.stdout
    assert "number of failed transactions: 0" in out.stdout


def test_the_protocol_errors_of_a_direct_connection(tx):
    c = WireClient.connect(tx.port, "alice", "s3cret", "job_alpha")
    try:
        # Bind of a statement this client never prepared: 26000, then nothing until Sync.
        c.send(b"B", b"\0nope\0" + b"\0\0\0\0\0\0")
        c.send(b"E", b"\0\0\0\0\0")
        c.send(b"S")
        kinds = c.read_until_ready()
        assert [k for k, _ in kinds] == [b"E", b"Z"]
        assert b"C26000" in kinds[0][1]
        # Parse twice under one name: 42P05, as direct.
        c.send(b"P", b"s1\0select 1\0\0\0")
        c.send(b"S")
        assert [k for k, _ in c.read_until_ready()] == [b"1", b"Z"]
        c.send(b"P", b"s1\0select 2\0\0\0")
        c.send(b"B", b"\0s1\0\0\0\0\0\0\0")
        c.send(b"S")
        kinds = c.read_until_ready()
        assert [k for k, _ in kinds] == [b"E", b"Z"] and b"C42P05" in kinds[0][1]
        # Close it, then it is gone for this client; a new Parse of the name works.
        c.send(b"C", b"Ss1\0")
        c.send(b"B", b"\0s1\0\0\0\0\0\0\0")
        c.send(b"S")
        kinds = c.read_until_ready()
        assert [k for k, _ in kinds] == [b"3", b"E", b"Z"] and b"C26000" in kinds[1][1]
        c.send(b"P", b"s1\0select 3\0\0\0")
        c.send(b"B", b"\0s1\0\0\0\0\0\0\0")
        c.send(b"E", b"\0\0\0\0\0")
        c.send(b"S")
        kinds = c.read_until_ready()
        assert [k for k, _ in kinds] == [b"1", b"2", b"D", b"C", b"Z"]
        assert kinds[2][1].endswith(b"3")
    finally:
        c.close()


@pytest.mark.parametrize("sql", [
    "set work_mem = '8MB'",
    "SET SESSION search_path = public",
    "listen jobs",
    "select pg_advisory_lock(42)",
    "declare c cursor with hold for select 1",
    "create temp table t (n int)",
    "prepare p as select 1",
])
def test_what_needs_a_session_is_refused_with_0A000(tx, sql):
    with _connect(tx) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            conn.execute(sql)
        assert "transaction pooling" in str(err.value)
        assert err.value.diag.message_hint
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_refusal_inside_a_transaction_aborts_it_as_any_error(tx):
    with _connect(tx) as conn:
        conn.execute("begin")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("set work_mem = '8MB'")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.execute("rollback")
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("sql", [
    "set local work_mem = '8MB'",
    "set transaction isolation level repeatable read",
    "select pg_advisory_xact_lock(42)",
    "create temp table t (n int) on commit drop",
    "select 'set work_mem = 1' as text_is_not_sql",
])
def test_what_lives_within_a_transaction_is_allowed(tx, sql):
    with _connect(tx) as conn, conn.transaction():
        conn.execute(sql)


def test_startup_options_are_kept_per_pooled_connection(router_factory, pg):
    r = _tx_router(router_factory, pg, 1)
    with psycopg.connect(r.dsn(), options="-c search_path=pg_catalog", autocommit=True) as a, \
            _connect(r) as b:
        for _ in range(3):
            assert a.execute("show search_path").fetchone() == ("pg_catalog",)
            assert b.execute("show search_path").fetchone() == ('"$user", public',)


def test_a_client_waits_for_a_busy_pool_is_told_and_then_served(tx1):
    with _connect(tx1) as holder, _connect(tx1) as waiter:
        notices: list[str] = []
        waiter.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        holder.execute("begin")
        holder.execute("select 1")
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(
            waiter.execute("select 42").fetchone()))
        t.start()
        deadline = 100
        while not notices and deadline:  # the NOTICE comes after --query-wait-notify
            t.join(0.1)
            deadline -= 1
        assert notices and "waiting for a server connection" in notices[0]
        assert not result
        holder.execute("commit")
        t.join(20)
        assert result == [(42,)]


def test_a_client_that_waits_too_long_gets_53300(tx1):
    with _connect(tx1) as holder, _connect(tx1) as waiter:
        holder.execute("begin")
        holder.execute("select 1")
        with pytest.raises(psycopg.OperationalError) as err:
            waiter.execute("select 1")
        assert err.value.sqlstate == "53300"
        holder.execute("commit")


def test_a_cancel_reaches_the_backend_running_the_clients_transaction(tx):
    with _connect(tx) as conn:
        failed: list[Exception] = []

        def cancel() -> None:
            try:
                conn.cancel_safe()  # libpq's own cancel, which checks the router's answer
            except Exception as exc:
                failed.append(exc)

        timer = threading.Timer(1.0, cancel)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")
        finally:
            timer.cancel()
            timer.join(10)
        assert not failed
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_backend_lost_mid_transaction_fails_that_client_only(tx1, pg):
    with _connect(tx1) as victim:
        victim.execute("begin")
        pid = victim.execute("select pg_backend_pid()").fetchone()[0]
        with psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                             password=SUPERUSER_PASSWORD, dbname="job_alpha",
                             autocommit=True) as direct:
            direct.execute("select pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
    with _connect(tx1) as next_client:
        assert next_client.execute("select 1").fetchone() == (1,)


def test_discard_all_forgets_prepared_statements_and_never_breaks_them(tx1):
    """As a simple query, DISCARD ALL is followed: its backend is pooled again, the router's
    statements on it forgotten (prepared again when used). Parsed (psycopg's way for
    every query), it runs later, at its Execute: that backend is closed after the
    transaction instead, so no statement the router thinks prepared is gone."""
    with _connect(tx1, prepare_threshold=0) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()[0]
        assert conn.execute("select %s::int", (1,)).fetchone() == (1,)
        # (behind psycopg's back: its cache of names is stale now, as it would be direct)
        assert conn.pgconn.exec_(b"discard all").status == psycopg.pq.ExecStatus.COMMAND_OK
        assert conn.execute("select %s::text", ("x",)).fetchone() == ("x",)
        assert conn.execute("select pg_backend_pid() + 0").fetchone()[0] == first
    with _connect(tx1, prepare_threshold=0) as conn:
        conn.execute("discard all")
        assert conn.execute("select %s::int", (3,)).fetchone() == (3,)
        assert conn.execute("select pg_backend_pid() + 1").fetchone()[0] != first + 1


def test_a_stop_ends_transaction_mode_clients_with_57p01(router_factory, pg):
    """Idle between transactions, a client is told 57P01 by the router (which knows the
    message boundaries); inside one, its backend is terminated, and PostgreSQL says it."""
    r = _tx_router(router_factory, pg, 2, "--shutdown-timeout", "1")
    idle, busy = _connect(r), _connect(r)
    try:
        idle.execute("select 1")
        busy.execute("begin")
        busy.execute("select 1")
        r.proc.send_signal(signal.SIGTERM)
        r.proc.wait(30)
        for conn in (idle, busy):
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("select 1")
            assert err.value.sqlstate == "57P01", err.value
    finally:
        idle.close()
        busy.close()


def test_deallocate_all_and_deallocate_one_as_direct(tx1):
    """DEALLOCATE ALL (psycopg sends it after DDL) forgets the client's statements and what
    the router had prepared on the backend; a lone DEALLOCATE of one statement forgets it
    for that client only. Two clients on one backend (pool_size 1)."""
    a = WireClient.connect(tx1.port, "alice", "s3cret", "job_alpha")
    b = WireClient.connect(tx1.port, "alice", "s3cret", "job_alpha")
    run = b"\0s1\0\0\0\0\0\0\0"  # Bind of s1 into the unnamed portal, no parameters

    def execute(c: WireClient) -> list[bytes]:
        c.send(b"B", run)
        c.send(b"E", b"\0\0\0\0\0")
        c.send(b"S")
        return [k for k, _ in c.read_until_ready()]

    try:
        for c in (a, b):
            c.send(b"P", b"s1\0select 41 + 1\0\0\0")
            c.send(b"S")
            assert [k for k, _ in c.read_until_ready()] == [b"1", b"Z"]
        a.send(b"Q", b"deallocate all\0")
        assert [k for k, _ in a.read_until_ready()] == [b"C", b"Z"]
        assert execute(a) == [b"E", b"Z"]  # gone for a, as direct (26000)
        assert execute(b) == [b"2", b"D", b"C", b"Z"]  # b's is prepared again for it
        a.send(b"P", b"s1\0select 41 + 1\0\0\0")  # the name is a's to use again
        a.send(b"S")
        assert [k for k, _ in a.read_until_ready()] == [b"1", b"Z"]
        assert execute(a) == [b"2", b"D", b"C", b"Z"]
        a.send(b"Q", b"DEALLOCATE s1\0")
        kinds = a.read_until_ready()
        assert kinds == [(b"C", b"DEALLOCATE\0"), (b"Z", b"I")]
        assert execute(a) == [b"E", b"Z"]
        assert execute(b) == [b"2", b"D", b"C", b"Z"]  # b keeps its own
    finally:
        a.close()
        b.close()


def test_a_client_that_does_not_read_holds_its_backend_back(tx, pg):
    """Backpressure: as direct, a backend whose client reads nothing waits on ClientWrite
    (the router does not read the whole result into its own memory), so a cancel still
    reaches a running query."""
    c = WireClient.connect(tx.port, "alice", "s3cret", "job_alpha")
    try:
        c.send(b"Q", b"select repeat('x', 1000) from generate_series(1, 300000) /* bp */\0")
        with psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres",
                             password=SUPERUSER_PASSWORD, dbname="job_alpha",
                             autocommit=True) as direct:
            def waiting_on_the_client() -> int | None:
                row = direct.execute(
                    "select pid from pg_stat_activity where query like '%/* bp */%' and "
                    "wait_event = 'ClientWrite' and pid <> pg_backend_pid()").fetchone()
                return row[0] if row else None
            pid = asyncio.run(until(waiting_on_the_client, "the backend to wait on its client"))
            # For 3 s the backend stays blocked and the router does not swell: without
            # backpressure it reads the 300 MB into its own memory within that time.
            rss = _rss_kb(tx.proc.pid)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                state = direct.execute("select state from pg_stat_activity where pid = %s",
                                       (pid,)).fetchone()
                assert state == ("active",), state
                assert _rss_kb(tx.proc.pid) - rss < 50_000
                time.sleep(0.1)
            direct.execute("select pg_cancel_backend(%s)", (pid,))
        kinds = []
        while True:  # now read it all: the result ends with the cancel's error
            kind, body = read_message(c.sock)
            if kind not in (b"D", b"T"):
                kinds.append((kind, body))
            if kind == b"Z":
                break
        assert kinds[0][0] == b"E" and b"C57014" in kinds[0][1]
    finally:
        c.close()


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS:")))


def test_a_backends_refusal_of_the_startup_options_reaches_the_client(tx):
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(tx.dsn(), options="-c work_mem=bogus", connect_timeout=10)
    assert 'invalid value for parameter "work_mem"' in str(err.value)
