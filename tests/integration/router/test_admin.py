"""The admin console: ``dbname=jobmesh`` (or ``pgbouncer``) with PgBouncer's SHOW commands
and columns, SHOW JOBS, KILL_CLIENT and RELOAD; admins act, stats principals only look,
everyone else is refused."""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from jobmesh.agent.postgres import bin_dir
from tests.support.router import routes_toml
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(90)

EXTRA_USERS = '''
[users.root]
password = "r00t-pw"
admin = true

[users.watcher]
password = "w4tch-pw"
stats = true
'''

# The columns of PgBouncer's console (its doc/usage.md, 1.23), which exporters read by name.
PGBOUNCER_COLUMNS = {
    "POOLS": "database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req "
             "sv_active sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login "
             "maxwait maxwait_us pool_mode load_balance_hosts",
    "CLIENTS": "type user database replication state addr port local_addr local_port "
               "connect_time request_time wait wait_us close_needed ptr link remote_pid tls "
               "application_name prepared_statements id",
    "SERVERS": "type user database replication state addr port local_addr local_port "
               "connect_time request_time wait wait_us close_needed ptr link remote_pid tls "
               "application_name prepared_statements id",
    "DATABASES": "name host port database force_user pool_size min_pool_size "
                 "reserve_pool_size server_lifetime pool_mode load_balance_hosts "
                 "max_connections current_connections max_client_connections "
                 "current_client_connections paused disabled",
    "STATS": "database total_xact_count total_query_count total_server_assignment_count "
             "total_received total_sent total_xact_time total_query_time total_wait_time "
             "total_client_parse_count total_server_parse_count total_bind_count "
             "total_client_login_count avg_xact_count avg_query_count "
             "avg_server_assignment_count avg_recv avg_sent avg_xact_time avg_query_time "
             "avg_wait_time avg_client_parse_count avg_server_parse_count avg_bind_count "
             "avg_client_login_count",
    "LISTS": "list items",
    "CONFIG": "key value default changeable",
    "USERS": "name pool_size reserve_pool_size pool_mode max_user_connections "
             "current_connections max_user_client_connections current_client_connections",
    "VERSION": "version",
}


@pytest.fixture
def router(router_factory, pg):
    return router_factory(routes_toml(pg) + EXTRA_USERS)


def console(router, user="root", password="r00t-pw", dbname="jobmesh") -> psycopg.Connection:
    # The console speaks the simple query protocol only, as PgBouncer's: a ClientCursor.
    return psycopg.connect(router.dsn(user=user, password=password, dbname=dbname),
                           connect_timeout=10, autocommit=True,
                           cursor_factory=psycopg.ClientCursor)


def show(conn: psycopg.Connection, what: str) -> list[dict]:
    cur = conn.execute(f"SHOW {what}")
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.mark.parametrize("what", sorted(PGBOUNCER_COLUMNS))
def test_every_show_command_has_pgbouncers_columns(router, what):
    with console(router) as conn, psycopg.connect(router.dsn(), autocommit=True):
        cur = conn.execute(f"SHOW {what}")
        assert [c.name for c in cur.description] == PGBOUNCER_COLUMNS[what].split()
        cur.fetchall()


def test_pools_clients_and_servers_show_a_session_and_the_backend_kept_after_it(router):
    with console(router) as conn:
        with psycopg.connect(router.dsn(), autocommit=True) as client:
            pid = client.info.backend_pid
            [pool] = show(conn, "POOLS")
            assert (pool["database"], pool["user"]) == ("job_alpha", "postgres")
            assert (pool["cl_active"], pool["sv_active"], pool["sv_idle"]) == (1, 1, 0)
            [c] = show(conn, "CLIENTS")
            assert (c["type"], c["user"], c["database"], c["state"]) == (
                "C", "alice", "job_alpha", "active")
            [s] = show(conn, "SERVERS")
            assert (s["type"], s["state"], s["remote_pid"]) == ("S", "active", pid)

        def kept() -> bool:
            return [s["state"] for s in show(conn, "SERVERS")] == ["idle"]

        until_sync(kept, "the backend kept")
        [pool] = show(conn, "POOLS")
        assert (pool["cl_active"], pool["sv_idle"]) == (0, 1)
        lists = {r["list"]: r["items"] for r in show(conn, "LISTS")}
        assert lists["used_clients"] == 0 and lists["used_servers"] == 1
        [db] = show(conn, "DATABASES")
        assert (db["name"], db["pool_mode"], db["current_connections"]) == (
            "job_alpha", "session", 1)
        [stats] = show(conn, "STATS")
        assert stats["total_server_assignment_count"] == 1 and stats["total_received"] > 0
        [job] = show(conn, "JOBS")
        assert (job["job"], job["state"], job["servers_idle"]) == ("alpha", "static", 1)


def until_sync(check, what: str) -> None:
    import asyncio
    asyncio.run(until(check, what))


def test_kill_client_ends_that_session(router):
    with console(router) as conn, psycopg.connect(router.dsn(), autocommit=True) as victim:
        [c] = show(conn, "CLIENTS")
        conn.execute(f"KILL_CLIENT {c['id']}")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        assert show(conn, "CLIENTS") == []
        with pytest.raises(psycopg.errors.UndefinedObject):
            conn.execute(f"KILL_CLIENT {c['id']}")


def test_a_stats_principal_may_show_and_not_act(router):
    with console(router, "watcher", "w4tch-pw", dbname="pgbouncer") as conn:
        assert show(conn, "VERSION")[0]["version"].startswith("jobmesh router ")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("KILL_CLIENT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("RELOAD")
        assert show(conn, "HELP")  # still usable after a refusal


def test_others_are_refused_at_login_and_unknown_commands_get_42601(router):
    with pytest.raises(psycopg.OperationalError) as exc:
        console(router, "alice", "s3cret")
    assert "may not use the admin console" in str(exc.value)
    with console(router) as conn, pytest.raises(psycopg.errors.SyntaxError) as err:
        conn.execute("SELECT 1")
    assert "unknown admin console command" in str(err.value)


def test_reload_rereads_the_route_file(router, pg):
    router.routes_path.write_text(routes_toml(pg, users={"alice": ("s3cret", ["alpha"]),
                                                         "carol": ("c4rol", ["alpha"])})
                                  + EXTRA_USERS)
    with console(router) as conn:
        conn.execute("RELOAD")
    router.wait_for_log(r"routes reloaded")
    with psycopg.connect(router.dsn(user="carol", password="c4rol"), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_psql_reads_the_console(router):
    out = subprocess.run([str(bin_dir() / "psql"), "-X", "-A", "-t", "-F", "|", "-c",
                          "SHOW LISTS", router.dsn(user="root", password="r00t-pw",
                                                   dbname="jobmesh")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "databases|1" in out.stdout.splitlines()
