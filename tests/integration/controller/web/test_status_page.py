"""The status page over real HTTP: a real aiohttp server on loopback, a real catalog.

No controller runs here (the browser tests in tests/e2e drive a whole mesh), so job
states change only when a test moves them as the reconciler would. What is checked
here is what a browser cannot be trusted to show: who gets in, what is refused, and
what every answer carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from jobmesh.controller.api.app import build_app
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.passwords import scram_verifier
from jobmesh.controller.web.guard import WebConfig
from tests.support.web import PageClient, page_client

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0ken-for-tests"
PW = "correct horse"


@dataclass
class Served:
    url: str
    catalog: Catalog


@contextlib.asynccontextmanager
async def serving(catalog: Catalog, tmp_path: Path,
                  config: WebConfig) -> AsyncIterator[Served]:
    app = build_app(catalog, token=TOKEN, state_dir=tmp_path, router=("127.0.0.1", 6432),
                    web_config=config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield Served(f"http://127.0.0.1:{runner.addresses[0][1]}", catalog)
    finally:
        await runner.cleanup()


@pytest.fixture
async def served(catalog: Catalog, tmp_path: Path) -> AsyncIterator[Served]:
    await catalog.create_principal("root", scram_verifier(PW), admin=True)
    await catalog.create_principal("analyst", scram_verifier(PW))
    async with serving(catalog, tmp_path, WebConfig()) as s:
        yield s


@pytest.fixture
async def visitor(served: Served) -> AsyncIterator[PageClient]:
    async with page_client(served.url) as c:
        yield c


@pytest.fixture
async def operator(visitor: PageClient) -> PageClient:
    await visitor.login("root", PW)
    return visitor


async def running_job(catalog: Catalog, job_id: str = "alpha") -> None:
    await catalog.create_job(job_id)
    await catalog.transition(job_id, "creating", "running", host="127.0.0.1", port=1)


# --- who gets in --------------------------------------------------------------------


async def test_nothing_is_shown_without_logging_in(served: Served,
                                                   visitor: PageClient) -> None:
    await running_job(served.catalog, "secret-job")
    for path, to in (("/", "/login"), ("/jobs/secret-job", "/login?next=/jobs/secret-job")):
        status, body, resp = await visitor.get(path)
        assert status == 303 and resp.headers["Location"] == to
        assert "secret-job" not in body
    status, _, _ = await visitor.get("/", headers={"X-Live-Fragment": "1"})
    assert status == 401
    status, _, _ = await visitor.get("/live")
    assert status == 401
    status, body, _ = await visitor.get("/login")
    assert status == 200 and "secret-job" not in body


async def test_an_admin_logs_in_with_the_catalog_password(served: Served,
                                                          visitor: PageClient) -> None:
    resp = await visitor.login("root", PW)
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("jobmesh_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http on loopback
    status, body, _ = await visitor.get("/")
    assert status == 200 and "root" in body
    login = [e for e in await served.catalog.events() if e.kind == "login"]
    assert [(e.job_id, e.actor) for e in login] == [(None, "root")]
    assert login[0].detail["source"] == "127.0.0.1"


@pytest.mark.parametrize(("name", "password"), [("root", "wrong"), ("analyst", PW),
                                                ("nobody", PW), ("'; drop", PW)])
async def test_a_wrong_password_or_a_non_admin_is_refused(served: Served, visitor: PageClient,
                                                          name: str, password: str) -> None:
    status, body, resp = await visitor.post("/login", {"name": name, "password": password})
    assert status == 401 and "Wrong name or password" in body
    assert "Set-Cookie" not in resp.headers
    status, _, _ = await visitor.get("/")
    assert status == 303
    failed = [e for e in await served.catalog.events() if e.kind == "login-failed"]
    assert [e.actor for e in failed] == [name]


async def test_the_session_id_is_not_in_the_catalog(served: Served, visitor: PageClient) -> None:
    resp = await visitor.login("root", PW)
    sid = re.match(r"jobmesh_session=([^;]+)", resp.headers["Set-Cookie"]).group(1)  # type: ignore[union-attr]
    rows = await served.catalog.pool.fetch("SELECT * FROM web_sessions")
    assert len(rows) == 1
    assert sid.encode() not in repr(dict(rows[0])).encode()
    assert rows[0]["id_sha256"] == hashlib.sha256(sid.encode()).digest()


async def test_logins_are_rate_limited_per_address(served: Served, visitor: PageClient) -> None:
    for _ in range(5):
        status, _, _ = await visitor.post("/login", {"name": "root", "password": "guess"})
        assert status == 401
    status, body, resp = await visitor.post("/login", {"name": "root", "password": PW})
    assert status == 429 and "Too many failed logins" in body  # even the right password
    assert int(resp.headers["Retry-After"]) >= 1
    status, _, _ = await visitor.get("/")
    assert status == 303


async def test_logout_ends_the_session(served: Served, operator: PageClient) -> None:
    csrf = await operator.csrf()
    cookie = operator.http.cookie_jar.filter_cookies(URL(operator.url))["jobmesh_session"].value
    status, _, resp = await operator.post("/logout", {"csrf": csrf})
    assert status == 303 and resp.headers["Location"] == "/login"
    # the old cookie, replayed, gets nothing
    status, _, _ = await operator.get("/", cookies={"jobmesh_session": cookie})
    assert status == 303
    assert [e.kind for e in await served.catalog.events() if e.job_id is None] == [
        "login", "logout"]


async def test_a_session_ends_when_it_expires_or_the_password_changes(
        served: Served, operator: PageClient) -> None:
    assert (await operator.get("/"))[0] == 200
    await served.catalog.pool.execute(
        "UPDATE web_sessions SET expires_at = now() - interval '1 second'")
    assert (await operator.get("/"))[0] == 303
    await operator.login("root", PW)
    assert (await operator.get("/"))[0] == 200
    await served.catalog.set_verifier("root", scram_verifier("new password"))
    assert (await operator.get("/"))[0] == 303


async def test_the_cookie_does_not_authenticate_the_api(operator: PageClient) -> None:
    async with operator.http.get(operator.url + "/v1/jobs") as resp:
        assert resp.status == 401  # the API keeps its bearer token
    async with operator.http.post(operator.url + "/v1/jobs/alpha/pause") as resp:
        assert resp.status == 401


# --- acting -----------------------------------------------------------------------------


async def test_an_action_with_the_csrf_token_pauses_the_job(served: Served,
                                                           operator: PageClient) -> None:
    await running_job(served.catalog)
    csrf = await operator.csrf()
    status, _, resp = await operator.post("/jobs/alpha/pause", {"csrf": csrf, "next": "/"})
    assert status == 303 and resp.headers["Location"] == "/"
    job = await served.catalog.job("alpha")
    assert job is not None and job.desired_state == "paused"
    (asked,) = [e for e in await served.catalog.events("alpha") if e.kind == "desired"]
    assert asked.actor == "root" and asked.detail == {"desired_state": "paused"}


@pytest.mark.parametrize("how", ["no token", "wrong token", "other origin", "no origin",
                                 "other referer"])
async def test_an_action_without_the_token_or_from_elsewhere_is_refused(
        served: Served, operator: PageClient, how: str) -> None:
    await running_job(served.catalog)
    csrf = await operator.csrf()
    form = {"csrf": csrf}
    origin: str | None = ""
    headers = {}
    if how == "no token":
        form = {}
    elif how == "wrong token":
        form = {"csrf": csrf[:-2] + "xx"}
    elif how == "other origin":
        origin = "http://127.0.0.1:1"
    elif how == "no origin":
        origin = None
    else:
        origin, headers = None, {"Referer": "http://evil.example/page"}
    status, body, _ = await operator.post("/jobs/alpha/pause", form, origin=origin,
                                          headers=headers)
    assert status == 403, body
    assert "<h1>403" in body
    job = await served.catalog.job("alpha")
    assert job is not None and job.desired_state == "running"


async def test_the_same_origin_referer_stands_in_for_a_missing_origin(
        served: Served, operator: PageClient) -> None:
    await running_job(served.catalog)
    csrf = await operator.csrf()
    status, _, _ = await operator.post("/jobs/alpha/end", {"csrf": csrf}, origin=None,
                                       headers={"Referer": operator.url + "/jobs/alpha/end"})
    assert status == 303
    job = await served.catalog.job("alpha")
    assert job is not None and job.desired_state == "ended"


async def test_ending_a_job_asks_for_confirmation(served: Served, operator: PageClient) -> None:
    await running_job(served.catalog)
    status, body, _ = await operator.get("/jobs/alpha")
    assert status == 200 and 'href="/jobs/alpha/end"' in body  # a link to a page, not a POST
    assert 'action="/jobs/alpha/end"' not in body
    status, body, _ = await operator.get("/jobs/alpha/end")
    assert status == 200 and "End job alpha?" in body and 'action="/jobs/alpha/end"' in body
    job = await served.catalog.job("alpha")
    assert job is not None and job.desired_state == "running"


# --- what every answer carries ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/login", "/", "/jobs/nope", "/static/style.css"])
async def test_pages_send_a_content_security_policy(operator: PageClient, path: str) -> None:
    _status, _, resp = await operator.get(path)
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"


async def test_an_unknown_host_name_is_refused(served: Served, visitor: PageClient) -> None:
    # DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its name.
    port = served.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        status, body, _ = await visitor.get("/login", headers={"Host": host})
        assert status == 421, host
        assert "host name" in body
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, _ = await visitor.get("/login", headers={"Host": host})
        assert status == 200, host


async def test_a_configured_https_origin_makes_the_cookie_secure(catalog: Catalog,
                                                                 tmp_path: Path) -> None:
    await catalog.create_principal("root", scram_verifier(PW), admin=True)
    config = WebConfig(origins=("https://status.example.com",))
    async with serving(catalog, tmp_path, config) as s, page_client(s.url) as c:
        status, _, _ = await c.get("/login", headers={"Host": "status.example.com"})
        assert status == 200
        status, _, resp = await c.post("/login", {"name": "root", "password": PW},
                                       origin="https://status.example.com",
                                       headers={"Host": "status.example.com"})
        assert status == 303
        cookie = resp.headers["Set-Cookie"]
        assert cookie.startswith("__Host-jobmesh_session=") and "Secure" in cookie


async def test_a_job_error_is_shown_as_text(served: Served, operator: PageClient) -> None:
    await running_job(served.catalog, "xss")
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    await served.catalog.failed_attempt("xss", "running", evil, gave_up=True)
    for path in ("/", "/jobs/xss"):
        status, body, _ = await operator.get(path)
        assert status == 200
        assert "<script>alert" not in body and "<img src=x" not in body
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in body


# --- what it shows ----------------------------------------------------------------------


async def test_a_thousand_jobs_are_counted_and_listed_a_page_at_a_time(
        served: Served, operator: PageClient) -> None:
    await served.catalog.pool.execute(
        "INSERT INTO jobs (id, desired_state, state, backend_password)"
        " SELECT 'job-' || lpad(i::text, 4, '0'), CASE WHEN i % 4 = 0 THEN 'running'"
        " ELSE 'paused' END, CASE WHEN i % 4 = 0 THEN 'running' ELSE 'paused' END, 'x'"
        " FROM generate_series(1, 1000) i")
    status, body, resp = await operator.get("/")
    assert status == 200
    assert "1000 jobs" in body and "paused <b>750</b>" in body and "running <b>250</b>" in body
    assert body.count('<tr data-job="') == 100 and "page 1 of 10" in body
    assert re.fullmatch(r"app;dur=[\d.]+", resp.headers["Server-Timing"])
    status, body, _ = await operator.get("/?state=running&sort=last_active&page=3")
    assert status == 200 and "250 of 1000 jobs" in body and "page 3 of 3" in body
    assert body.count('<tr data-job="') == 50
    status, body, _ = await operator.get("/?q=job-099")
    assert re.findall(r'<tr data-job="([^"]+)"', body) == [f"job-099{i}" for i in range(10)]


async def test_router_reports_give_each_job_its_clients(served: Served,
                                                       operator: PageClient) -> None:
    await running_job(served.catalog, "alpha")
    await served.catalog.report_activity("r1", "127.0.0.1:6432", {"alpha": 3}, [], 30)
    await served.catalog.report_activity("r2", "127.0.0.1:6433", {"alpha": 2}, [], 30)
    _, body, _ = await operator.get("/jobs/alpha")
    assert "<dt>Clients</dt><dd>5</dd>" in body
    _, body, _ = await operator.get("/")
    assert body.count("reporting</span>") == 2
    await served.catalog.report_activity("r2", "127.0.0.1:6433", {}, [], 0)  # goodbye
    _, body, _ = await operator.get("/jobs/alpha")
    assert "<dt>Clients</dt><dd>3</dd>" in body
    _, body, _ = await operator.get("/")
    assert body.count("reporting</span>") == 1 and "127.0.0.1:6433" not in body


async def test_wake_latency_comes_from_the_events(served: Served, operator: PageClient) -> None:
    await running_job(served.catalog, "alpha")
    for seconds in (1, 2, 8):
        await served.catalog.pool.execute(
            "INSERT INTO events (job_id, at, kind, detail) VALUES"
            " ('alpha', now() - make_interval(secs => $1 + 60), 'wake-requested', '{}')",
            seconds)
        await served.catalog.pool.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state) VALUES"
            " ('alpha', now() - interval '60 seconds', 'transition', 'resuming', 'running')")
    _, body, _ = await operator.get("/")
    assert "<b>3</b> wakes" in body and "p50 <b>2 s</b>" in body and "p95 <b>8 s</b>" in body


async def test_the_live_stream_tells_of_a_change(served: Served, operator: PageClient) -> None:
    await running_job(served.catalog, "alpha")
    async with operator.http.get(operator.url + "/live?job=alpha") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "frame-ancestors" in resp.headers["Content-Security-Policy"]
        assert await resp.content.readline() == b"retry: 3000\n"
        await resp.content.readline()
        await served.catalog.set_desired("alpha", "paused")
        async with asyncio.timeout(10):
            assert await resp.content.readline() == b"event: change\n"
            assert await resp.content.readline() == b"data: alpha\n"


async def test_a_stop_ends_open_streams(catalog: Catalog, tmp_path: Path) -> None:
    await catalog.create_principal("root", scram_verifier(PW), admin=True)
    app = build_app(catalog, token=TOKEN, state_dir=tmp_path, web_config=WebConfig())
    # A stream left open would hold the stop for shutdown_timeout: far beyond the wait.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=600)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with page_client(url) as c:
            await c.login("root", PW)
            async with c.http.get(url + "/live") as resp:
                await resp.content.readline()
                await asyncio.wait_for(runner.cleanup(), 30)
                with contextlib.suppress(aiohttp.ClientError):
                    await resp.content.read()  # the stream ended
    finally:
        await runner.cleanup()


async def test_a_logout_without_a_session_only_clears_the_cookie(visitor: PageClient) -> None:
    status, _, resp = await visitor.post("/logout", {})
    assert status == 303 and resp.headers["Location"] == "/login"
