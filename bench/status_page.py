"""Benchmark the status page's server time with 100, 1,000 and 10,000 jobs in the catalog.

    .venv/bin/python bench/status_page.py [--rounds 30] [--sizes 100,1000,10000]

A catalog PostgreSQL (default settings, as `jobmesh up`) gets N jobs in a mix of
states (70 % paused, 20 % running, 5 % ended, 3 % failed with an error, 2 % on
their way), ten events each, three snapshots each, wakes in the last hour, and two
routers' reports; the controller's app (the API and the status page, exactly as
`jobmesh controller` serves them, without a reconciler) serves it on loopback.
A logged-in client asks for each page in turn, round after round (interleaved),
and reads the page's own ``Server-Timing`` (the handler, its catalog queries
included) beside the time the client saw. There is no peer: a status page is
not something PgBouncer or pgBackRest serve. The figures are the page's own, at
each catalog size.

Then headless Chromium (Debian's) takes the screenshot the README shows, of a
real mesh: a controller and a router as subprocesses, six jobs with their own
PostgreSQL, some paused, one woken by a client, clients connected.

Writes status_page.json, status_page.png (p50 and p95 by page and size) and
status_page_overview.png to --out, and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _wake_mesh as wm
from _peers import REPO, BenchError
from aiohttp import web

from jobmesh.agent.store import open_store
from jobmesh.controller.api.app import build_app
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.passwords import scram_verifier
from jobmesh.controller.storage.keeper import Keeper
from jobmesh.controller.storage.retention import Retention
from jobmesh.controller.web.guard import WebConfig
from tests.support.waiting import until
from tests.support.web import CHROMIUM, CHROMIUM_ARGS, PageClient

PW = "bench-pw"
PAGES = {
    "overview": ("/", {}),
    "sorted by size": ("/?sort=size", {}),
    "paused, page 5": ("/?state=paused&page=5", {}),
    "search": ("/?q=scrape-00", {}),
    "live part": ("/", {"X-Live-Fragment": "1"}),
    "job page": ("/jobs/scrape-00050", {}),
}

# N jobs and what a busy catalog holds about them (the ids are 'scrape-' and 5 digits).
FILL = """
INSERT INTO jobs (id, desired_state, state, backend_password, error, last_active, created_at)
SELECT 'scrape-' || lpad(i::text, 5, '0'),
       CASE WHEN i % 100 < 70 THEN 'paused' WHEN i % 100 < 90 THEN 'running'
            WHEN i % 100 < 95 THEN 'ended' WHEN i % 100 < 98 THEN 'running'
            WHEN i % 2 = 0 THEN 'running' ELSE 'paused' END,
       CASE WHEN i % 100 < 70 THEN 'paused' WHEN i % 100 < 90 THEN 'running'
            WHEN i % 100 < 95 THEN 'ended' WHEN i % 100 < 98 THEN 'failed'
            WHEN i % 2 = 0 THEN 'resuming' ELSE 'pausing' END,
       'x',
       CASE WHEN i % 100 BETWEEN 95 AND 97 THEN 'restore failed: checksum mismatch in '
            || 'base/16384/' || i || ' <script>alert(1)</script>' END,
       now() - make_interval(secs => (i * 37) % 86400),
       now() - interval '2 days'
FROM generate_series($1::int, $2::int) i;

INSERT INTO events (job_id, at, kind, from_state, to_state, duration_ms, bytes, detail)
SELECT 'scrape-' || lpad(i::text, 5, '0'),
       now() - interval '2 days' + make_interval(secs => k * 600 + i % 600),
       CASE WHEN k % 5 = 0 THEN 'desired' ELSE 'transition' END,
       (ARRAY['running', 'pausing', 'paused', 'resuming'])[k % 4 + 1],
       (ARRAY['pausing', 'paused', 'resuming', 'running'])[k % 4 + 1],
       100 + (i * k) % 4000, (i::bigint * k * 4096) % 50000000, '{}'
FROM generate_series($1::int, $2::int) i, generate_series(1, 10) k;

INSERT INTO snapshots (job_id, id, kind, size_bytes, stored_bytes, manifest, created_at)
SELECT 'scrape-' || lpad(i::text, 5, '0'), 's' || k, 'pause', 40000000 + (i * 7919) % 900000000,
       (i::bigint * k * 104729) % 20000000, '{}', now() - make_interval(hours => k)
FROM generate_series($1::int, $2::int) i, generate_series(1, 3) k;

-- a wake of every 20th job in the last hour: asked, then running 0.2 to 12 s later
INSERT INTO events (job_id, at, kind, detail)
SELECT 'scrape-' || lpad(i::text, 5, '0'), now() - interval '30 minutes', 'wake-requested', '{}'
FROM generate_series($1::int, $2::int) i WHERE i % 20 = 0;
INSERT INTO events (job_id, at, kind, from_state, to_state, duration_ms)
SELECT 'scrape-' || lpad(i::text, 5, '0'),
       now() - interval '30 minutes' + make_interval(secs => 0.2 + (i % 60) / 5.0),
       'transition', 'resuming', 'running', 150
FROM generate_series($1::int, $2::int) i WHERE i % 20 = 0;
"""


def workdir(stack: contextlib.ExitStack) -> Path:
    """A directory the postgres OS user can reach, removed at the end."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jm-page-")))
    root.chmod(0o755)
    return root


async def fill(catalog: Catalog, first: int, last: int) -> None:
    async with catalog.pool.acquire() as conn:
        for statement in FILL.split(";\n"):
            if statement.strip():
                await conn.execute(statement, first, last)
        clients = {f"scrape-{i:05d}": 1 + i % 4 for i in range(first, last + 1)
                   if i % 100 in range(70, 90)}
        half = dict(list(clients.items())[::2])
        for router, share in (("router-a", half), ("router-b", clients)):
            await conn.execute("SELECT jobmesh_router_report($1, $2, $3, '{}', 600)",
                               router, f"127.0.0.1:{6432 if router == 'router-a' else 6433}",
                               share)
        await conn.execute("ANALYZE")


async def measure(client: PageClient, rounds: int) -> dict[str, dict[str, Any]]:
    samples: dict[str, dict[str, list[float]]] = {name: {"server": [], "client": []}
                                                  for name in PAGES}
    sizes: dict[str, int] = {}
    for name, (path, headers) in PAGES.items():  # one unmeasured view each: warm caches
        status, body, _ = await client.get(path, headers=headers)
        if status != 200:
            raise BenchError(f"{name}: {status} {body[:200]}")
    for _ in range(rounds):
        for name, (path, headers) in PAGES.items():
            started = time.perf_counter()
            status, body, resp = await client.get(path, headers=headers)
            took = (time.perf_counter() - started) * 1000
            if status != 200:
                raise BenchError(f"{name}: {status} {body[:200]}")
            m = re.fullmatch(r"app;dur=([\d.]+)", resp.headers.get("Server-Timing", ""))
            if m is None:
                raise BenchError(f"{name}: no Server-Timing header")
            samples[name]["server"].append(float(m.group(1)))
            samples[name]["client"].append(took)
            sizes[name] = len(body.encode())
    out = {}
    for name, s in samples.items():
        out[name] = {f"{kind}_p{p}_ms": round(pct(v, p), 2) for kind, v in s.items()
                     for p in (50, 95)}
        out[name]["bytes"] = sizes[name]
    return out


def pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(p / 100 * len(ordered)) - 1)]


async def screenshot(url: str, path: Path) -> None:
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():
        raise BenchError("Debian's chromium is missing: apt-get install chromium")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(url + "/login")
            await page.get_by_label("Name").fill("ops")
            await page.get_by_label("Password").fill(PW)
            await page.get_by_role("button", name="Log in").click()
            await page.wait_for_url(url + "/")
            await page.locator("text=surveyed").wait_for(timeout=30_000)
            await page.screenshot(path=str(path))
        finally:
            await browser.close()


async def real_mesh_screenshot(path: Path) -> dict[str, Any]:
    """The README's picture: a real mesh (controller, router, six jobs' PostgreSQL) with
    jobs running, paused and woken, and clients connected."""
    import asyncpg

    with contextlib.ExitStack() as stack:
        root = workdir(stack)
        _inst, dsn = wm.start_catalog(stack, root)
        mesh = wm.start_mesh(stack, root / "state", dsn, wake_timeout=120)
        catalog = await Catalog.connect(dsn)
        clients: list[asyncpg.Connection] = []
        try:
            await catalog.create_principal("ops", scram_verifier(PW), admin=True)
            await catalog.create_principal(wm.USER, scram_verifier(wm.PASSWORD))
            await catalog.grant(wm.USER, "*", "write")
            jobs = ["shop-prices", "shop-reviews", "news-daily", "news-archive",
                    "jobs-board", "weather"]
            for job in jobs:
                await catalog.create_job(job)
            for n, job in enumerate(jobs):
                await wm.wait_state(catalog, job, "running")
                conn = await asyncpg.connect(mesh.dsn(job), timeout=120)
                await conn.execute("CREATE TABLE pages AS SELECT g AS id, repeat('x', 500) AS"
                                   f" body FROM generate_series(1, {(n + 1) * 20000}) g")
                await conn.close()
            for job in jobs[2:5]:
                await wm.pause(catalog, job)
            # a wake: a client of a paused job, through the router
            conn = await asyncpg.connect(mesh.dsn("news-daily"), timeout=120)
            await conn.fetchval("SELECT count(*) FROM pages")
            clients += [conn, *[await asyncpg.connect(mesh.dsn("shop-prices"), timeout=60)
                                for _ in range(3)]]
            await until(lambda: catalog.pool.fetchval(  # the router's next report
                "SELECT count(*) FROM router_reports WHERE clients ? 'shop-prices'"),
                "the router's report of the clients", timeout=60, interval=0.5)
            await screenshot(f"http://127.0.0.1:{mesh.api_port}", path)
            return {"jobs": len(jobs), "paused": 2, "woken": 1}
        finally:
            for c in clients:
                await c.close()
            await catalog.close()


async def run(sizes: list[int], rounds: int, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"rounds": rounds, "sizes": {}}
    with contextlib.ExitStack() as stack:
        root = workdir(stack)
        _inst, dsn = wm.start_catalog(stack, root)
        catalog = await Catalog.connect(dsn, max_size=10)
        store = open_store(f"file://{root / 'store'}")
        runner = None
        try:
            await catalog.migrate()
            await catalog.create_principal("ops", scram_verifier(PW), admin=True)
            keeper = Keeper(store, catalog, Retention(3, 86400.0))
            app = build_app(catalog, token="bench", store=store, state_dir=root,
                            router=("127.0.0.1", 6432), keeper=keeper, web_config=WebConfig())
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            client = PageClient(url)
            try:
                await client.login("ops", PW)
                have = 0
                for n in sizes:
                    await fill(catalog, have + 1, n)
                    have = n
                    print(f"{n} jobs in the catalog: measuring ...", file=sys.stderr)
                    results["sizes"][str(n)] = await measure(client, rounds)
            finally:
                await client.close()
        finally:
            if runner is not None:
                await runner.cleanup()
            await store.close()
            await catalog.close()
    return results


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    names = list(PAGES)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(sizes)
    for k, n in enumerate(sizes):
        p50 = [results["sizes"][n][name]["server_p50_ms"] for name in names]
        p95 = [results["sizes"][n][name]["server_p95_ms"] for name in names]
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, p95, width, alpha=0.35, color=f"C{k}")
        ax.bar(xs, p50, width, label=f"{int(n):,} jobs (p50; pale: p95)", color=f"C{k}")
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("server time, ms")
    ax.set_title("Status page: server time per view (Server-Timing), by catalog size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(sizes, args.rounds, args.out))
    results["screenshot"] = asyncio.run(
        real_mesh_screenshot(args.out / "status_page_overview.png"))
    (args.out / "status_page.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "status_page.png")
    print("| page | " + " | ".join(f"{int(n):,} jobs p50 / p95 (ms)" for n in results["sizes"])
          + " |")
    print("|---|" + "---:|" * len(results["sizes"]))
    for name in PAGES:
        cells = [f"{r[name]['server_p50_ms']:.1f} / {r[name]['server_p95_ms']:.1f}"
                 for r in results["sizes"].values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    kb = {n: round(statistics.mean(v["bytes"] for v in r.values()) / 1000, 1)
          for n, r in results["sizes"].items()}
    print(f"\nmean page size (kB): {kb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
