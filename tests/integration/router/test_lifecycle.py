"""The router process over its life: timeouts, reloads, shutdown, cancels, metrics, CLI.

Over ~400 lines on purpose: one router process's life, start to stop, sharing
its fixtures; the other router behaviours have files of their own.
"""

from __future__ import annotations

import asyncio
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml
from tests.support.waiting import until

ALPHA = (("job", "alpha"),)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, keyed by (name, sorted labels)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_until(port: int, done: Callable[[dict], bool], timeout: float = 10) -> dict:
    """Scrape until ``done(samples)``: the router updates metrics after the client moves on."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"metrics never reached the expected state: {samples}"


def bytes_total(samples: dict, direction: str) -> float:
    return samples.get(("jobmesh_router_bytes_total", (("direction", direction), *ALPHA)), 0)


def reload(router, text: str | bytes) -> None:
    if isinstance(text, bytes):
        router.routes_path.write_bytes(text)
    else:
        router.routes_path.write_text(text)
    router.signal(signal.SIGHUP)


def refused_login(router, **kw: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as exc_info:
        psycopg.connect(router.dsn(**kw), connect_timeout=10)
    return exc_info.value


# --- startup timeout -------------------------------------------------------------------


def test_silent_connections_are_closed_at_startup_timeout(router_factory, pg):
    r = router_factory(routes_toml(pg), "--startup-timeout", "2")
    sel = selectors.DefaultSelector()
    silent = []
    try:
        started = time.monotonic()
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            silent.append(s)
        with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
            for i in range(20):
                assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        assert sel.select(timeout=0) == [], "silent connections closed before the timeout"
        still_open = len(silent)
        while still_open:
            events = sel.select(timeout=started + 30 - time.monotonic())
            assert events, f"{still_open} silent connections still open after 30 s"
            for key, _ in events:
                try:
                    data = key.fileobj.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"expected the connection closed, got {data!r}"
                sel.unregister(key.fileobj)
                still_open -= 1
        assert time.monotonic() - started >= 1.5
    finally:
        for s in silent:
            s.close()


# --- SIGHUP ------------------------------------------------------------------------------


def test_reload_adds_a_user(router, pg):
    assert "password authentication failed" in str(refused_login(router, user="carol",
                                                                 password="c4rol"))
    users = {"alice": ("s3cret", ["alpha"]), "bob": ("hunter2", []), "carol": ("c4rol", "*")}
    reload(router, routes_toml(pg, users=users))
    router.wait_for_log(r"routes reloaded: 1 jobs, 3 users")
    with psycopg.connect(router.dsn(user="carol", password="c4rol"), connect_timeout=10) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_reload_changes_a_password_for_new_connections(router, pg):
    users = {"alice": ("n3w", ["alpha"]), "bob": ("hunter2", [])}
    reload(router, routes_toml(pg, users=users))
    router.wait_for_log(r"routes reloaded")
    assert "password authentication failed" in str(refused_login(router))
    with psycopg.connect(router.dsn(password="n3w"), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_reload_adds_a_job(router, pg):
    jobs = {"alpha": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                      "password": SUPERUSER_PASSWORD},
            "beta": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                     "password": SUPERUSER_PASSWORD, "database": "postgres"}}
    users = {"alice": ("s3cret", ["alpha", "beta"])}
    reload(router, routes_toml(pg, users=users, jobs=jobs))
    router.wait_for_log(r"routes reloaded: 2 jobs, 1 users")
    with psycopg.connect(router.dsn(dbname="job_beta"), connect_timeout=10) as conn:
        assert conn.execute("select current_database()").fetchone() == ("postgres",)


def test_session_opened_before_reload_keeps_working(router, pg):
    with psycopg.connect(router.dsn(), connect_timeout=10) as live:
        reload(router, routes_toml(pg, users={"bob": ("hunter2", [])}, jobs={}))
        router.wait_for_log(r"routes reloaded: 0 jobs, 1 users")
        assert "does not exist" in str(refused_login(router, user="bob", password="hunter2"))
        for i in range(3):
            assert live.execute("select %s::int", (i,)).fetchone() == (i,)


BROKEN = [
    pytest.param(b"[jobs.alpha\nhost = ", id="invalid_toml"),
    pytest.param(b'[jobs.alpha]\nhost = "127.0.0.1"\nport = 70000\nuser = "postgres"\n',
                 id="bad_port"),
    pytest.param(b'[users.alice]\npassword = "s3cr\xe9t"\njobs = ["alpha"]\n', id="not_utf8"),
]


@pytest.mark.parametrize("content", BROKEN)
def test_broken_route_file_is_refused_on_reload_with_one_line(router, content):
    with psycopg.connect(router.dsn(), connect_timeout=10) as live:
        reload(router, content)
        refused_login(router, password="wrong")  # a marker logged after the reload attempt
        router.wait_for_log(r"rejected client: 28P01")
        after_hup = [line for line in router.seen if "reloaded" in line or "Exception" in line]
        assert len(after_hup) == 1 and "routes not reloaded" in after_hup[0], router.seen
        assert "Traceback" not in "\n".join(router.seen)
        with psycopg.connect(router.dsn(), connect_timeout=10) as new:
            assert new.execute("select 1").fetchone() == (1,)
        assert live.execute("select 2").fetchone() == (2,)


# --- SIGTERM -----------------------------------------------------------------------------


def test_sigterm_without_sessions_exits_0_promptly(router):
    started = time.monotonic()
    router.signal(signal.SIGTERM)
    assert router.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5  # the default --shutdown-timeout is 30 s


def test_listener_is_closed_after_sigterm(router):
    with psycopg.connect(router.dsn(), connect_timeout=10) as live:  # keeps the router draining
        router.signal(signal.SIGTERM)
        router.wait_for_log(r"shutting down")
        # The line is logged just before the listener closes: retry past that instant.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", router.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            except ConnectionResetError:  # queued just as the listener closed
                pass
            assert time.monotonic() < deadline, "the router still accepts after SIGTERM"
        assert live.execute("select 1").fetchone() == (1,)
    assert router.proc.wait(timeout=30) == 0


# --- CancelRequest -----------------------------------------------------------------------


def test_cancel_with_wrong_key_is_ignored_and_counted(metrics_router):
    r = metrics_router
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        pgconn = conn.pgconn
        pgconn.send_query(b"select pg_sleep(1), 'survived'")
        while pgconn.flush():
            pass
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as s:
            s.sendall(struct.pack("!iiII", 16, 80877102, pgconn.backend_pid, 12345))
            assert s.recv(1) == b""  # the router answers a CancelRequest by closing
        results = []
        while (res := _next_result(pgconn)) is not None:
            results.append(res)
        assert [res.status for res in results] == [psycopg.pq.ExecStatus.TUPLES_OK]
        assert results[0].get_value(0, 1) == b"survived"
        assert conn.execute("select 1").fetchone() == (1,)
    unknown = ("jobmesh_router_cancel_requests_total", (("outcome", "unknown_key"),))
    assert scrape(r.metrics_port).get(unknown) == 1


def test_cancel_with_right_key_cancels_the_query(metrics_router):
    r = metrics_router
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        conn.pgconn.send_query(b"select pg_sleep(60)")
        while conn.pgconn.flush():
            pass
        # A cancel that reaches PostgreSQL before the query runs is ignored: wait for it.
        with psycopg.connect(r.dsn(), connect_timeout=10, autocommit=True) as probe:
            asyncio.run(until(lambda: probe.execute(
                "select wait_event = 'PgSleep' from pg_stat_activity where pid = %s",
                (conn.info.backend_pid,)).fetchone() == (True,), "the sleep to start"))
        conn.cancel_safe(timeout=10)
        res = _next_result(conn.pgconn)
        assert res is not None
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"57014"
        while _next_result(conn.pgconn) is not None:
            pass
        assert conn.execute("select 1").fetchone() == (1,)
    forwarded = ("jobmesh_router_cancel_requests_total", (("outcome", "forwarded"),))
    assert scrape(r.metrics_port).get(forwarded) == 1


def _next_result(pgconn) -> psycopg.pq.abc.PGresult | None:
    sel = selectors.DefaultSelector()
    sel.register(pgconn.socket, selectors.EVENT_READ)
    pgconn.consume_input()
    while pgconn.is_busy():
        assert sel.select(timeout=20), "the query never finished"
        pgconn.consume_input()
    return pgconn.get_result()


# --- metrics -----------------------------------------------------------------------------


def test_metrics_count_open_client_connections(metrics_router):
    r = metrics_router
    key = ("jobmesh_router_client_connections", ALPHA)
    with psycopg.connect(r.dsn(), connect_timeout=10), psycopg.connect(r.dsn(), connect_timeout=10):
        assert scrape(r.metrics_port).get(key) == 2
    with psycopg.connect(r.dsn(), connect_timeout=10):
        assert scrape_until(r.metrics_port, lambda m: m.get(key) == 1).get(key) == 1


def test_metrics_bytes_grow_with_traffic(metrics_router):
    r = metrics_router
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        before = scrape(r.metrics_port)
        query = "select repeat('x', 1000000), %s::text"
        assert len(conn.execute(query, ("y" * 50_000,)).fetchone()[0]) == 1_000_000
        after = scrape(r.metrics_port)
    assert 50_000 <= bytes_total(after, "in") - bytes_total(before, "in") < 60_000
    # "out" counts bytes the client acked: allow for one delayed ACK.
    assert 900_000 <= bytes_total(after, "out") - bytes_total(before, "out") < 1_100_000


def client_tcp_bytes(conn: psycopg.Connection) -> tuple[int, int]:
    """(bytes acked, bytes received) as the client's own kernel counts them (TCP_INFO)."""
    with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as s:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
    return struct.unpack_from("=QQ", info, 120)


def test_metrics_bytes_out_match_what_the_client_received(metrics_router):
    r = metrics_router
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        conn.execute("select repeat('x', 100000)").fetchone()
        _, received = client_tcp_bytes(conn)
        # The router counts bytes the client acked: wait out the client's delayed ACK.
        scrape_until(r.metrics_port, lambda m: bytes_total(m, "out") == received)


def test_metrics_bytes_never_decrease_when_a_client_disconnects(metrics_router):
    r = metrics_router
    key = ("jobmesh_router_client_connections", ALPHA)
    conn = psycopg.connect(r.dsn(), connect_timeout=10)
    conn.execute("select repeat('x', 100000)").fetchone()
    _, received = client_tcp_bytes(conn)
    live = scrape_until(r.metrics_port, lambda m: bytes_total(m, "out") == received)
    conn.close()
    finished = scrape_until(r.metrics_port, lambda m: key not in m)
    assert bytes_total(finished, "in") >= bytes_total(live, "in")
    assert bytes_total(finished, "out") >= bytes_total(live, "out")


def test_metrics_scrape_succeeds_while_sessions_come_and_go(metrics_router):
    r = metrics_router
    stop, failed = threading.Event(), threading.Event()
    errors: list[Exception] = []

    def churn() -> None:
        while not stop.is_set():
            psycopg.connect(r.dsn(), connect_timeout=10).close()

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrape(r.metrics_port)
            except urllib.error.HTTPError as exc:
                errors.append(exc)
                failed.set()

    sessions = [psycopg.connect(r.dsn(), connect_timeout=10) for _ in range(200)]
    threads = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
    threads += [threading.Thread(target=scraper, daemon=True) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        failed.wait(timeout=15)  # a healthy router never sets it: the whole window passes
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for c in sessions:
            c.close()
    if errors:
        raise errors[0]


def test_metrics_count_auth_failures(metrics_router):
    r = metrics_router
    assert scrape(r.metrics_port).get(("jobmesh_router_auth_failures_total", ())) == 0
    refused_login(r, password="wrong")
    assert scrape(r.metrics_port).get(("jobmesh_router_auth_failures_total", ())) == 1


def test_metrics_count_errors_by_sqlstate(metrics_router):
    r = metrics_router
    refused_login(r, password="wrong")
    refused_login(r, password="wrong")
    refused_login(r, user="bob", password="hunter2")
    samples = scrape(r.metrics_port)
    assert samples.get(("jobmesh_router_errors_total", (("sqlstate", "28P01"),))) == 2
    assert samples.get(("jobmesh_router_errors_total", (("sqlstate", "42501"),))) == 1


def test_metrics_time_backend_connects(metrics_router):
    r = metrics_router
    count = ("jobmesh_router_backend_connect_seconds_count", ())
    assert scrape(r.metrics_port).get(count) == 0
    for _ in range(2):
        with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
            conn.execute("select 1")
    samples = scrape(r.metrics_port)
    assert samples.get(count) == 2
    assert samples[("jobmesh_router_backend_connect_seconds_sum", ())] > 0


# --- command line ------------------------------------------------------------------------


@pytest.fixture
def good_routes(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(routes_toml(None, jobs={"alpha": {"host": "127.0.0.1", "port": 5432,
                                                      "user": "postgres"}}))
    return str(path)


def _write(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


CLI_CASES: dict[str, Callable] = {
    "routes_missing": lambda tmp, good, busy: ["--routes", "/nonexistent"],
    "routes_not_toml": lambda tmp, good, busy: ["--routes", _write(tmp, "b.toml", b"[jobs")],
    "routes_bad_port": lambda tmp, good, busy: ["--routes", _write(
        tmp, "p.toml", b'[jobs.a]\nhost = "h"\nport = 0\nuser = "u"\n')],
    "routes_not_utf8": lambda tmp, good, busy: ["--routes", _write(tmp, "u.toml", b"x = '\xff'")],
    "listen_no_port": lambda tmp, good, busy: ["--routes", good, "--listen", "localhost"],
    "listen_port_too_big": lambda tmp, good, busy: ["--routes", good, "--listen", "h:70000"],
    "listen_port_in_use": lambda tmp, good, busy: ["--routes", good, "--listen",
                                                   f"127.0.0.1:{busy}"],
    "require_tls_without_cert": lambda tmp, good, busy: ["--routes", good, "--require-tls"],
    "tls_cert_missing": lambda tmp, good, busy: ["--routes", good, "--tls-cert", "/nope.crt",
                                                 "--tls-key", "/nope.key"],
    "metrics_bad_value": lambda tmp, good, busy: ["--routes", good, "--listen", "127.0.0.1:0",
                                                  "--metrics", "nowhere"],
}


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_bad_cli_input_exits_nonzero_with_one_line(tmp_path, good_routes, case):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = case(tmp_path, good_routes, busy.getsockname()[1])
        proc = subprocess.run([sys.executable, "-m", "jobmesh", "router", *args],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jobmesh router: ") and "Traceback" not in proc.stderr


BAD_FILES = [
    pytest.param(None, id="missing"),
    pytest.param(b"[jobs", id="not_toml"),
    pytest.param(b"x = '\xff'", id="not_utf8"),
]


@pytest.mark.parametrize("content", BAD_FILES)
def test_bad_route_file_is_a_usage_error_naming_the_file(tmp_path, content):
    path = tmp_path / "routes.toml"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "router", "--routes", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
