"""The console's PAUSE and RESUME (PgBouncer's meaning: hold a job's traffic, return once it
uses no server), SHOW POOLS of a transaction-mode job, and the lifecycle commands'
refusals on a route file (their catalog side is in tests/e2e/test_pool_modes.py)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml

from .test_admin import EXTRA_USERS, console, show

pytestmark = pytest.mark.timeout(90)


def _router(router_factory, pg, mode: str):
    jobs = {"alpha": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                      "password": SUPERUSER_PASSWORD, "pool_mode": mode, "pool_size": 2}}
    return router_factory(routes_toml(pg, jobs=jobs) + EXTRA_USERS)


class Background:
    """A call in a thread, whose end the test awaits (or checks has not come)."""

    def __init__(self, fn) -> None:
        self.result: list[object] = []
        self.error: list[BaseException] = []
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result.append(fn())
            except BaseException as exc:  # (handed to the test)
                self.error.append(exc)
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 30) -> object:
        assert self.done.wait(timeout), "the call did not return"
        if self.error:
            raise self.error[0]
        return self.result[0]


def _query(router, sql: str) -> object:
    with psycopg.connect(router.dsn(), connect_timeout=30, autocommit=True) as conn:
        return conn.execute(sql).fetchone()


def test_pause_waits_for_the_session_and_holds_new_clients_until_resume(router_factory, pg):
    r = _router(router_factory, pg, "session")
    with console(r) as admin, console(r) as watcher:
        client = psycopg.connect(r.dsn(), autocommit=True)
        client.execute("select 1")
        pause = Background(lambda: admin.execute("PAUSE job_alpha"))
        assert not pause.done.wait(1.0)  # a session still holds its server
        client.close()
        pause.wait()
        [db] = show(watcher, "DATABASES")
        assert db["paused"] == 1
        held = Background(lambda: _query(r, "select 7"))
        assert not held.done.wait(1.0)  # held after its login (a NOTICE says why)
        admin.execute("RESUME job_alpha")
        assert held.wait() == (7,)
        [db] = show(watcher, "DATABASES")
        assert db["paused"] == 0


def test_pause_in_transaction_mode_waits_for_the_transaction_not_the_client(
        router_factory, pg):
    r = _router(router_factory, pg, "transaction")
    with console(r) as admin, psycopg.connect(r.dsn(), autocommit=True) as client:
        client.execute("begin")
        client.execute("select 1")
        pause = Background(lambda: admin.execute("PAUSE"))
        assert not pause.done.wait(1.0)
        client.execute("commit")  # the transaction ends: its server is given back
        pause.wait()
        nxt = Background(lambda: client.execute("select 8").fetchone())
        assert not nxt.done.wait(1.0)  # the connected client's next transaction waits
        admin.execute("RESUME")
        assert nxt.wait() == (8,)


def test_show_pools_of_a_transaction_mode_job(router_factory, pg):
    r = _router(router_factory, pg, "transaction")
    with console(r) as admin, psycopg.connect(r.dsn(), autocommit=True) as a, \
            psycopg.connect(r.dsn(), autocommit=True) as b:
        a.execute("begin")
        a.execute("select 1")
        [pool] = show(admin, "POOLS")
        assert (pool["database"], pool["pool_mode"]) == ("job_alpha", "transaction")
        assert (pool["cl_active"], pool["cl_waiting"], pool["sv_active"]) == (2, 0, 1)
        a.execute("commit")
        b.execute("select 1")
        [pool] = show(admin, "POOLS")
        assert pool["sv_active"] == 0 and pool["sv_idle"] >= 1
        servers = show(admin, "SERVERS")
        assert servers and all(s["state"] == "idle" for s in servers)
        [db] = show(admin, "DATABASES")
        assert (db["pool_mode"], db["pool_size"]) == ("transaction", 2)
        [stats] = show(admin, "STATS")
        assert stats["total_xact_count"] == 2  # begin ... commit is one


@pytest.mark.parametrize(("command", "sqlstate"), [
    ("RESUME job_alpha", "55000"),  # not paused
    ("PAUSE job_nope", "3D000"),
    ("SNAPSHOT_STOP job_alpha", "0A000"),  # a route file's jobs have no lifecycle
    ("WAKE job_alpha", "0A000"),
    ("PAUSE job_alpha job_beta", "42601"),
])
def test_console_actions_refused_with_their_sqlstate(router_factory, pg, command, sqlstate):
    r = _router(router_factory, pg, "session")
    with console(r) as admin:
        with pytest.raises(psycopg.Error) as err:
            admin.execute(command)
        assert err.value.sqlstate == sqlstate
        assert admin.execute("SHOW VERSION").fetchone()  # the console goes on


def test_a_stats_principal_may_not_pause(router_factory, pg):
    r = _router(router_factory, pg, "session")
    with console(r, user="watcher", password="w4tch-pw") as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("PAUSE job_alpha")
