"""The status page in a real browser (Debian's headless Chromium, driven by Playwright)
against a real mesh: catalog, controller on the local backend, router, job PostgreSQL.

Screenshots go to test-artifacts/ (``tests/support/web.py``), never into the repository.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, expect

from jobmesh.controller.catalog.passwords import scram_verifier
from tests.support.mesh import Mesh
from tests.support.web import artifact

pytestmark = pytest.mark.timeout(240)
OPS, PW = "ops", "pw-for-the-page"
WAIT = 90_000  # ms: a job's pause or wake, on a loaded 2-core machine


@pytest.fixture
async def page_mesh(mesh: Mesh) -> Mesh:
    await mesh.catalog.create_principal(OPS, scram_verifier(PW), admin=True)
    await mesh.add_user("scraper", PW, star="write")
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    return mesh


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    p = await context.new_page()
    try:
        yield p
    finally:
        await p.screenshot(path=artifact(f"{request.node.name}-last.png"), full_page=True)
        await context.close()


def base(mesh: Mesh) -> str:
    return f"http://127.0.0.1:{mesh.api_port}"


async def log_in(page: Page, mesh: Mesh) -> None:
    await page.goto(base(mesh) + "/")
    await expect(page).to_have_url(re.compile(r"/login$"))
    await page.get_by_label("Name").fill(OPS)
    await page.get_by_label("Password").fill(PW)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(base(mesh) + "/")


async def test_an_operator_pauses_a_job_and_sees_it_change_live(page_mesh: Mesh,
                                                                page: Page) -> None:
    mesh = page_mesh
    await mesh.create_job("scrape-1")
    await log_in(page, mesh)
    row = page.locator('tr[data-job="scrape-1"]')
    state = row.locator("[data-state]")
    await expect(state).to_have_text("running")
    await page.screenshot(path=artifact("overview-running.png"), full_page=True)

    await row.get_by_role("button", name="Pause").click()
    await expect(page).to_have_url(base(mesh) + "/")
    await page.evaluate("window.stayed = true")  # a reload would forget it
    await expect(state).to_have_text("paused", timeout=WAIT)
    # A client wakes the job through the router: the open page follows.
    conn = await asyncpg.connect(mesh.dsn("scrape-1", "scraper", PW), timeout=60)
    try:
        await expect(state).to_have_text("running", timeout=WAIT)
    finally:
        await conn.close()
    assert await page.evaluate("window.stayed") is True  # changed without a reload
    await page.screenshot(path=artifact("overview-live.png"), full_page=True)

    await row.get_by_role("link", name="scrape-1").click()
    await expect(page.get_by_role("heading", name="Job scrape-1")).to_be_visible()
    timeline = page.locator("ol.timeline")
    await expect(timeline).to_contain_text("asked to be paused by ops")
    await expect(timeline).to_contain_text("running → pausing")
    await expect(timeline).to_contain_text(re.compile(r"pausing → paused in [\d.]+ m?s"))
    await expect(timeline).to_contain_text("a client's connection asked to wake it")
    await page.screenshot(path=artifact("job-page.png"), full_page=True)

    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(re.compile(r"/login$"))
    await page.goto(base(mesh) + "/jobs/scrape-1")
    await expect(page).to_have_url(re.compile(r"/login\?next=/jobs/scrape-1$"))
    kinds = [(e.kind, e.actor) for e in await mesh.catalog.events() if e.job_id is None]
    assert kinds == [("login", OPS), ("logout", OPS)]


async def test_acting_without_the_token_or_from_another_origin_fails(
        page_mesh: Mesh, page: Page, unused_tcp_port: int) -> None:
    mesh = page_mesh
    await mesh.create_job("target")
    await log_in(page, mesh)
    token = await page.locator('input[name="csrf"]').first.input_value()

    # From the page itself, but without the token.
    status = await page.evaluate(
        "fetch('/jobs/target/pause', {method: 'POST', body: new URLSearchParams("
        "{next: '/'})}).then(r => r.status)")
    assert status == 403

    # From another origin (another port of 127.0.0.1: the same site, so the cookie
    # goes along), even with the token.
    attacker = web.Application()

    async def lure(_req: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=(
            f'<form id="f" method="post" action="{base(mesh)}/jobs/target/pause">'
            f'<input name="csrf" value="{token}"></form>'
            '<script>document.getElementById("f").submit()</script>'))

    attacker.router.add_get("/", lure)
    runner = web.AppRunner(attacker, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
        async with page.expect_navigation(url=re.compile(r"/jobs/target/pause$")) as nav:
            await page.goto(f"http://127.0.0.1:{unused_tcp_port}/")
        response = await nav.value
        assert response is not None and response.status == 403
        await expect(page.get_by_role("heading")).to_contain_text("another site")
    finally:
        await runner.cleanup()
    job = await mesh.catalog.job("target")
    assert job is not None and job.desired_state == "running" and job.state == "running"
    assert [e for e in await mesh.catalog.events("target") if e.kind == "desired"] == []


async def test_nothing_is_seen_without_logging_in(page_mesh: Mesh, page: Page) -> None:
    mesh = page_mesh
    await mesh.create_job("hidden-job")
    for path in ("/", "/jobs/hidden-job", "/?state=running"):
        await page.goto(base(mesh) + path)
        await expect(page).to_have_url(re.compile(r"/login(\?next=.*)?$"))
        await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        # (the login form keeps the path asked for, to go there after: nothing else)
        assert "hidden-job" not in await page.locator("body").inner_text()
        assert await page.locator("[data-job], [data-state]").count() == 0
    status = await page.evaluate("fetch('/live').then(r => r.status)")
    assert status == 401
    await page.get_by_label("Name").fill(OPS)
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_contain_text("Wrong name or password")
    assert "hidden-job" not in await page.locator("body").inner_text()


async def test_a_job_error_containing_a_script_is_shown_as_text(page_mesh: Mesh,
                                                               page: Page) -> None:
    mesh = page_mesh
    await mesh.create_job("xss")
    evil = ("<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
            " disk full")
    await mesh.catalog.failed_attempt("xss", "running", evil, gave_up=True)
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    await log_in(page, mesh)
    await expect(page.locator("section", has_text="Failures")).to_contain_text(evil)
    await page.get_by_role("link", name="xss").first.click()
    await expect(page.locator("pre.error")).to_have_text(evil)
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("img[src=x]").count() == 0
    assert dialogs == []
    await page.screenshot(path=artifact("job-error-as-text.png"), full_page=True)


async def test_the_overview_reads_on_a_phone(page_mesh: Mesh, browser: Browser) -> None:
    mesh = page_mesh
    await mesh.create_job("a-job-with-a-rather-long-name-for-a-phone-screen")
    context = await browser.new_context(viewport={"width": 390, "height": 844},
                                        device_scale_factor=2, is_mobile=True, has_touch=True)
    try:
        page = await context.new_page()
        await log_in(page, mesh)
        await expect(page.locator("[data-state]")).to_have_text("running")
        # the page fits the screen's width: only the job table scrolls sideways, in its box
        assert await page.evaluate(
            "document.documentElement.scrollWidth <= window.innerWidth") is True
        await page.screenshot(path=artifact("overview-phone.png"), full_page=True)
        await page.get_by_role("link", name="a-job-with-a-rather-long-name").click()
        await expect(page.locator("ol.timeline")).to_contain_text("creating → running")
        assert await page.evaluate(
            "document.documentElement.scrollWidth <= window.innerWidth") is True
    finally:
        await context.close()
