"""``jobmesh router --catalog-dsn``: routes, users and grants from the catalog, and wakes.

Real processes throughout: a router subprocess, a catalog on PostgreSQL, and
a job's PostgreSQL with the roles a job has; the test plays the controller
(``tests.catalog_harness.FakeController``).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from jobmesh.agent.postgres import free_port
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import Job
from jobmesh.router.credentials import make_verifier
from jobmesh.router.errors import ClientError
from jobmesh.router.routes import Principal
from jobmesh.router.wake import assess
from tests.support.catalog_harness import (
    FakeController,
    TcpProxy,
    add_user,
    assert_error,
    dsn,
    last_active_moves,
    log_line,
    metric_reaches,
    paused_job,
    query,
    row_becomes,
    running_job,
    scrape,
    set_backend_password,
    wakes_requested,
    wire_login,
)

pytestmark = pytest.mark.timeout(120)


# --- pure rules ---------------------------------------------------------------------------


def test_write_wins_when_several_grants_match_and_admins_write_everywhere() -> None:
    v = make_verifier("x")
    carol = Principal("carol", v, (("a*", "read"), ("alpha", "write"), ("b?ta", "read")))
    assert (carol.access("alpha"), carol.access("alps"), carol.access("beta")) == \
        ("write", "read", "read")
    assert carol.access("gamma") is None
    assert Principal("root", v, (), admin=True).access("anything") == "write"


def _job(**kw: object) -> Job:
    base = dict(id="a", state="paused", desired_state="running", host=None, port=None,
                agent_url=None, backend_password="pw", spec={}, progress=None, error=None,
                attempts=0, last_active=None, created_at=None, updated_at=None)
    return Job(**{**base, **kw})  # type: ignore[arg-type]


def test_a_wake_waits_until_running_at_an_address_and_gives_up_on_ended_or_failing_jobs():
    assert assess("a", _job(state="running", host="h", port=1))
    assert not assess("a", _job(state="resuming"))
    assert not assess("a", _job(state="resuming", error="disk full", attempts=2))
    for gone in (_job(desired_state="ended"), _job(desired_state="deleted"),
                 _job(error="disk full", attempts=3), None):
        with pytest.raises(ClientError) as info:
            assess("a", gone)
        assert info.value.sqlstate == ("3D000" if gone is None else "57P03")


# --- routing a running job -------------------------------------------------------------------


async def test_running_job_is_reached_with_asyncpg_psycopg_and_psql(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn)
    assert await query(router, "select current_user || '@' || current_database()") == \
        "job_owner@job_alpha"
    async with await psycopg.AsyncConnection.connect(dsn(router), connect_timeout=10) as conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)
    psql = await asyncio.create_subprocess_exec(
        "psql", dsn(router), "-Atc", "select current_user", stdout=subprocess.PIPE)
    out, _ = await psql.communicate()
    assert (psql.returncode, out.decode().strip()) == (0, "job_owner")


async def test_a_job_created_before_its_announcement_arrives_is_found(catalog, job_pg, routers):
    """A client connecting right after a create may beat the NOTIFY: the router asks the
    catalog before answering 3D000. (The create here runs with triggers off, so no NOTIFY
    is ever sent.)"""
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn)
    async with catalog.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("INSERT INTO jobs (id, desired_state, state, backend_password,"
                           " host, port) VALUES ('alpha', 'running', 'running', 'pw',"
                           " '127.0.0.1', $1)", job_pg.port)
    set_backend_password(job_pg, "pw")
    assert await query(router, "select current_database()") == "job_alpha"


async def test_read_grant_is_job_reader_and_cannot_write(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    await add_user(catalog, "bob", ("alpha", "read"))
    await add_user(catalog, "root", admin=True)
    router = await routers.start(catalog.dsn)
    assert await query(router, "select current_user", "root") == "job_owner"
    conn = await asyncpg.connect(dsn(router, "bob"), timeout=30)
    try:
        assert await conn.fetchval("select current_user") == "job_reader"
        await conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("insert into t values (1)")
        await query(router, "insert into t values (2) returning n", "alice")
        assert await conn.fetchval("select count(*) from t where n = 2") >= 1
    finally:
        await conn.close()


# --- who may wake what ----------------------------------------------------------------------


async def test_hundred_clients_of_a_paused_job_share_one_wake(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    metrics = free_port()
    router = await routers.start(catalog.dsn, "--metrics", f"127.0.0.1:{metrics}")
    release = asyncio.Event()
    async with FakeController(catalog, job_pg.port, release=release) as controller:
        clients = [asyncio.create_task(query(router, "select current_user"))
                   for _ in range(100)]
        await metric_reaches(metrics, "jobmesh_router_clients_waiting", 100)
        release.set()
        assert await asyncio.gather(*clients) == ["job_owner"] * 100
    assert controller.resumes == 1
    assert await wakes_requested(catalog) == 1
    samples = await asyncio.to_thread(scrape, metrics)
    assert samples["jobmesh_router_wakes_requested_total"] == 1
    assert samples["jobmesh_router_wake_wait_seconds_count"] == 100
    assert samples["jobmesh_router_clients_waiting"] == 0


async def test_failed_logins_and_ungranted_users_wake_nothing(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    await add_user(catalog, "bob", ("beta", "write"))
    router = await routers.start(catalog.dsn)
    assert_error(await wire_login(router.port, password="wrong"), "28P01", "password")
    assert_error(await wire_login(router.port, user="mallory"), "28P01", "password")
    assert_error(await wire_login(router.port, user="bob"), "42501", "grant bob access to alpha")
    assert_error(await wire_login(router.port, database="job_nope"), "3D000", "job id")
    assert await wakes_requested(catalog) == 0
    job = await catalog.job("alpha")
    assert job is not None and job.desired_state == "paused"


async def test_waiting_client_hears_wake_progress_as_notices(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn)
    release = asyncio.Event()  # the job runs once the client has heard the progress

    def heard(text: str) -> None:
        if text.endswith("restoring 120 MB"):
            release.set()

    async with FakeController(catalog, job_pg.port, release=release):
        login = await wire_login(router.port, on_notice=heard)
    assert login.error is None
    assert login.notices == ["waking job_alpha", "waking job_alpha: restoring 120 MB"]


async def test_psql_shows_the_wake_and_its_slow_restore_outlives_the_startup_timeout(
        catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn, "--startup-timeout", "1")
    async with FakeController(catalog, job_pg.port, restore_seconds=2) as controller:
        psql = await asyncio.create_subprocess_exec(
            "psql", dsn(router), "-Atc", "select 42", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await psql.communicate()
    assert (psql.returncode, out.decode().strip()) == (0, "42"), err.decode()
    assert "NOTICE:  waking job_alpha: restoring 120 MB" in err.decode()
    assert controller.resumes == 1


async def test_client_hanging_up_while_waiting_stops_waiting(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    metrics = free_port()
    router = await routers.start(catalog.dsn, "--metrics", f"127.0.0.1:{metrics}")
    heard = asyncio.Event()
    client = asyncio.create_task(wire_login(router.port, on_notice=lambda _: heard.set()))
    await heard.wait()
    await metric_reaches(metrics, "jobmesh_router_clients_waiting", 1)
    client.cancel()  # closes the socket mid-wait
    await asyncio.gather(client, return_exceptions=True)
    # Well before --wake-timeout (60s) would have ended the wait.
    await metric_reaches(metrics, "jobmesh_router_clients_waiting", 0, timeout=10)


async def test_client_of_a_job_about_to_pause_keeps_it_running(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    await catalog.set_desired("alpha", "paused")  # decided, not yet begun
    router = await routers.start(catalog.dsn)
    assert await query(router, "select 1") == 1  # served at once, not held
    await row_becomes(catalog, lambda job: job.desired_state == "running")
    assert await wakes_requested(catalog) == 1


async def test_wake_timeout_is_57P03_with_a_hint(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn, "--wake-timeout", "1")
    login = await wire_login(router.port)  # no controller: nothing resumes it
    error = assert_error(login, "57P03", "reconnect in a moment")
    assert "did not start within 1s" in error["M"]
    assert login.notices == ["waking job_alpha"]
    assert await wakes_requested(catalog) == 1


async def test_ended_job_is_57P03_with_resume_hint_and_is_not_woken(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await catalog.set_desired("alpha", "ended")
    await catalog.transition("alpha", "running", "ended")
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn)
    assert_error(await wire_login(router.port), "57P03", "jobmesh job resume alpha")
    assert await wakes_requested(catalog) == 0


async def test_job_failing_to_resume_ends_the_wait_at_once(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn, "--wake-timeout", "60")
    started = time.monotonic()
    async with FakeController(catalog, job_pg.port, fail="snapshot missing"):
        login = await wire_login(router.port)
    error = assert_error(login, "57P03", "events")
    assert "snapshot missing" in error["M"]
    assert time.monotonic() - started < 30


# --- following the catalog --------------------------------------------------------------------


async def test_new_user_new_grant_and_revoke_apply_without_restart(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    router = await routers.start(catalog.dsn)
    await add_user(catalog, "carol")
    await log_line(router, r"catalog: user carol updated \(0 grants\)")
    assert_error(await wire_login(router.port, user="carol"), "42501", "grant carol")
    await catalog.grant("carol", "al*", "read")
    await log_line(router, r"catalog: user carol updated \(1 grants\)")
    assert await query(router, "select current_user", "carol") == "job_reader"
    await catalog.revoke("carol", "al*")
    await log_line(router, r"catalog: user carol updated \(0 grants\)")
    assert_error(await wire_login(router.port, user="carol"), "42501", "grant carol")


async def test_sighup_reloads_the_whole_catalog(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    router = await routers.start(catalog.dsn)
    await log_line(router, r"catalog: loaded 1 jobs, 0 users")
    router.signal(signal.SIGHUP)
    await log_line(router, r"catalog: loaded 1 jobs, 0 users")


async def test_lost_listen_connection_reconnects_and_reloads(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    router = await routers.start(catalog.dsn)
    await catalog.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    await log_line(router, r"catalog: LISTEN connection lost")
    await add_user(catalog, "dave", ("alpha", "write"))
    # Announced if the router listens again already, else found by its reload.
    await log_line(router, r"catalog: (user dave updated|loaded 1 jobs, 1 users)")
    assert await query(router, "select current_user", "dave") == "job_owner"


async def test_open_session_keeps_its_job_active(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn, "--activity-interval", "0.2")
    conn = await asyncpg.connect(dsn(router), timeout=30)
    try:
        await last_active_moves(catalog)
    finally:
        await conn.close()


async def test_end_of_the_last_session_marks_its_job_active(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn, "--activity-interval", "3600")
    conn = await asyncpg.connect(dsn(router), timeout=30)
    await last_active_moves(catalog, conn.close)  # no periodic touch within the test


# --- when the catalog is away -------------------------------------------------------------------


async def test_catalog_unreachable_at_start_is_57P03_not_a_hang(routers):
    router = await routers.start(f"postgresql://postgres:pw@127.0.0.1:{free_port()}/catalog")
    assert_error(await wire_login(router.port), "57P03", "try again shortly")


@pytest.fixture
async def proxied_dsn(catalog_dsn: str, catalog: Catalog) -> AsyncIterator[tuple[str, TcpProxy]]:
    host_port = catalog_dsn.split("@", 1)[1].split("/", 1)[0]
    proxy = TcpProxy(int(host_port.rsplit(":", 1)[1]))
    await proxy.start()
    yield catalog_dsn.replace(host_port, f"127.0.0.1:{proxy.port}"), proxy
    proxy.cut()


async def test_known_running_job_is_served_while_the_catalog_is_down(
        catalog, job_pg, routers, proxied_dsn):
    via_proxy, proxy = proxied_dsn
    await running_job(catalog, job_pg)
    await paused_job(catalog, job_pg, "beta")  # the roles' password is now beta's
    await catalog.pool.execute("UPDATE jobs SET backend_password = $1 WHERE id = 'alpha'",
                               (await catalog.job("beta")).backend_password)
    await add_user(catalog, "alice", ("*", "write"))
    router = await routers.start(via_proxy)
    proxy.cut()
    await log_line(router, r"catalog: LISTEN connection lost")
    assert await query(router, "select current_database()") == "job_alpha"
    assert_error(await wire_login(router.port, database="job_beta"), "57P03", "try again")
    assert_error(await wire_login(router.port, database="job_new"), "57P03", "try again")
    await add_user(catalog, "erin", ("alpha", "read"))  # announced to nobody
    await proxy.start()
    await log_line(router, r"catalog: loaded 2 jobs, 2 users")
    assert await query(router, "select current_user", "erin") == "job_reader"
    assert await wakes_requested(catalog, "beta") == 0


# --- workers ---------------------------------------------------------------------------


async def test_workers_route_from_the_catalog_and_share_one_wake(catalog, job_pg, routers):
    await paused_job(catalog, job_pg)
    await add_user(catalog, "alice", ("alpha", "write"))
    router = await routers.start(catalog.dsn, "--workers", "2", dsn_in_env=True)
    async with FakeController(catalog, job_pg.port) as controller:
        got = await asyncio.gather(*(query(router, "select current_user") for _ in range(20)))
    assert got == ["job_owner"] * 20
    assert (controller.resumes, await wakes_requested(catalog)) == (1, 1)
