"""``--workers N``: several processes behind one listener behave as one router."""

from __future__ import annotations

import os
import signal
import urllib.request

import psycopg
import pytest

from jobmesh.agent.postgres import free_port
from tests.support.cancels import sleep_and_cancel
from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml

pytestmark = pytest.mark.timeout(90)


def _connect(router, **kw) -> psycopg.Connection:
    return psycopg.connect(router.dsn(**kw), connect_timeout=10, autocommit=True)


def test_cancel_requests_reach_the_session_whichever_worker_receives_them(router_factory, pg):
    router = router_factory(routes_toml(pg), "--workers", "2")
    # Each cancel connection lands on either worker; if forwarding between
    # workers were broken, about half of these would time out.
    for _ in range(8):
        sleep_and_cancel(router.dsn())


def test_job_connection_limit_is_exact_across_workers(router_factory, pg):
    jobs = {"alpha": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                      "password": SUPERUSER_PASSWORD, "max_connections": 3}}
    router = router_factory(routes_toml(pg, jobs=jobs), "--workers", "2")
    held = [_connect(router) for _ in range(3)]
    try:
        for _ in range(4):  # whichever worker takes it, the fourth is refused
            with pytest.raises(psycopg.OperationalError) as exc:
                _connect(router)
            assert "too many clients already (job alpha allows 3)" in str(exc.value)
        held.pop().close()
        _connect(router).close()
    finally:
        for conn in held:
            conn.close()


def test_metrics_sum_all_workers(router_factory, pg):
    port = free_port()
    router = router_factory(routes_toml(pg), "--workers", "2", "--metrics", f"127.0.0.1:{port}")
    conns = [_connect(router) for _ in range(6)]
    try:
        for c in conns:
            c.execute("select 1")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert 'jobmesh_router_client_connections{job="alpha"} 6.0' in body.decode()
    finally:
        for c in conns:
            c.close()


def test_sighup_reloads_every_worker(router_factory, pg):
    router = router_factory(routes_toml(pg), "--workers", "2")
    users = {"alice": ("s3cret", ["alpha"]), "carol": ("pw-carol", ["alpha"])}
    router.routes_path.write_text(routes_toml(pg, users=users))
    router.signal(signal.SIGHUP)
    router.wait_for_log("routes reloaded")
    router.wait_for_log("routes reloaded")
    for _ in range(6):
        with _connect(router, user="carol", password="pw-carol") as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_a_killed_worker_is_replaced(router_factory, pg):
    router = router_factory(routes_toml(pg), "--workers", "2")
    router.wait_for_log(r"router worker 0/2 serving")
    router.wait_for_log(r"router worker 1/2 serving")
    worker_pids = [int(p) for p in os.popen(f"pgrep -P {router.proc.pid}").read().split()]
    assert len(worker_pids) == 2
    os.kill(worker_pids[0], signal.SIGKILL)
    router.wait_for_log("exited with .*restarting it")
    router.wait_for_log(r"router worker \d/2 serving")
    for _ in range(4):
        with _connect(router) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_sigterm_stops_the_supervisor_and_its_workers(router_factory, pg):
    router = router_factory(routes_toml(pg), "--workers", "2")
    worker_pids = [int(p) for p in os.popen(f"pgrep -P {router.proc.pid}").read().split()]
    assert router.stop() == 0
    for pid in worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
