"""Benchmark what hundreds of running jobs cost on one machine, and a wake storm among them.

    .venv/bin/python bench/scale.py [--catalog-jobs 1000] [--running 200] [--storm 50]

A catalog PostgreSQL, ``jobmesh controller`` (local backend, file:// store,
``--max-running R``) and ``jobmesh router`` run as subprocesses (bench/
_wake_mesh.py). In one run:

1. **agent**: ``jobmesh agent host`` spawned alone five times: from spawn to
   answering ``/healthz``, and its idle PSS, for a file:// and an s3:// store.
2. **creates**: R + S jobs created through the catalog, four at a time, each
   timed to ``running``; the first R without eviction, the rest each evicting a
   running job (``--max-running R``). The S evicted ones are the storm's.
3. **mesh PSS** (``/proc/<pid>/smaps_rollup``) at R running, by part: the
   jobs' PostgreSQL processes, the agent host, controller, router, catalog.
4. **storm**: S clients connect through the router at once, one to each paused
   job; each is timed from ``connect()`` to its first row (S evictions with it).
5. **catalog**: controller and router PSS before and after the catalog grows to
   N jobs (the extra ones inserted as paused jobs that never ran), after a resync.
6. **neighbour**: job A runs ``pgbench -R`` (fixed rate, well under capacity)
   alone, then beside job B burning CPU on four connections, with B limited to
   half a CPU (its cgroup) and without limits; A's latency p95 each time.

Writes scale.json and scale.png to --out, a markdown table on stdout.

Over ~400 lines on purpose: one run measuring six things that share one mesh
(bench/_wake_mesh.py holds the mesh itself); each part is a function.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _wake_mesh as wm
import aiohttp
import asyncpg
from _peers import REPO, BenchError

from jobmesh.agent.postgres import bin_dir
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.passwords import scram_verifier

CORES = os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--catalog-jobs", type=int, default=1000)
    p.add_argument("--running", type=int, default=200)
    p.add_argument("--storm", type=int, default=50)
    p.add_argument("--neighbour-seconds", type=float, default=15)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/jobmesh-bench-scale"))
    return p.parse_args(argv)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes() -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((int(entry.name),
                            (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
    return out


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))], 1)


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95),
            "max": pct(values, 100)}


# --- 1. the agent alone ------------------------------------------------------------------


async def agent_alone(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, store in (("file", f"file://{work / 'agent-store'}"),
                        ("s3", "s3://bench-bucket/prefix")):
        times, psses = [], []
        for i in range(5):
            state = work / f"agent-{kind}-{i}.json"
            argv = [sys.executable, "-m", "jobmesh", "agent", "host", "--no-api-token",
                    "--store", store, "--state", str(state)]
            if kind == "s3":
                argv += ["--s3-endpoint", "http://127.0.0.1:9"]
            t = time.perf_counter()
            proc = subprocess.Popen(  # noqa: ASYNC220 (the spawn is what is timed)
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})
            try:
                async with aiohttp.ClientSession() as http:
                    while True:
                        if proc.poll() is not None:
                            raise BenchError(f"agent host ({kind}) exited: {proc.returncode}")
                        with contextlib.suppress(OSError, ValueError, KeyError,
                                                 aiohttp.ClientError):
                            port = json.loads(state.read_text())["port"]
                            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                                if r.status == 200:
                                    break
                        await asyncio.sleep(0.002)
                times.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(1)
                psses.append(pss_kb(proc.pid) / 1024)
            finally:
                proc.terminate()
                proc.wait(10)
        out[kind] = {"spawn_to_serving_ms": summary(times),
                     "idle_pss_mb": round(statistics.median(psses), 1)}
        say(f"agent host, {kind} store: spawn to serving {out[kind]['spawn_to_serving_ms']}, "
            f"idle PSS {out[kind]['idle_pss_mb']} MB")
    return out


# --- 2-5. the mesh ---------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """CPU seconds of the process and of the children it waited for (pg_ctl, cp ...)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def mesh_pss(mesh: wm.Mesh, catalog_pid: int | None, *, cpu: bool = False) -> dict[str, float]:
    """PSS (MB) of the mesh's processes by part; with ``cpu``, their CPU seconds instead."""
    parts: dict[str, float] = {"postgres": 0, "agent_host": 0, "wal_receivers": 0,
                               "controller": 0, "router": 0, "catalog": 0}
    jobs = str(mesh.state / "jobs") + "/"
    postmasters = {int((p / "postmaster.pid").read_text().split()[0])
                   for p in mesh.state.glob("jobs/*/pgdata") if (p / "postmaster.pid").exists()}
    for pid, cmd in processes():
        kb = cpu_s(pid) * 1024 if cpu else pss_kb(pid)
        parent = _ppid(pid)
        if pid in postmasters or parent in postmasters:
            parts["postgres"] += kb
        elif "agent host" in cmd and str(mesh.state) in cmd:
            parts["agent_host"] += kb
        elif "pg_receivewal" in cmd and jobs in cmd:
            parts["wal_receivers"] += kb
        elif " controller " in cmd and str(mesh.state) in cmd:
            parts["controller"] += kb
        elif " router " in cmd and mesh.catalog_dsn in cmd:
            parts["router"] += kb
        elif catalog_pid is not None and (pid == catalog_pid or parent == catalog_pid):
            parts["catalog"] += kb
    return {k: round(v / 1024, 1) for k, v in parts.items()}


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def process_counts(mesh: wm.Mesh) -> dict[str, Any]:
    postmasters = {int((p / "postmaster.pid").read_text().split()[0])
                   for p in mesh.state.glob("jobs/*/pgdata") if (p / "postmaster.pid").exists()}
    per_job = [1 + sum(1 for pid, _ in processes() if _ppid(pid) == pm) for pm in
               list(postmasters)[:10]]
    return {"postgres_processes_per_job": statistics.median(per_job) if per_job else None}


async def create_jobs(catalog: Catalog, ids: list[str], concurrency: int = 4) -> list[float]:
    sem = asyncio.Semaphore(concurrency)
    times: list[float] = []

    async def one(job_id: str) -> None:
        async with sem:
            t = time.perf_counter()
            await catalog.create_job(job_id, {})
            await wm.wait_state(catalog, job_id, "running", timeout=600)
            times.append((time.perf_counter() - t) * 1000)

    await asyncio.gather(*(one(j) for j in ids))
    return times


async def storm(mesh: wm.Mesh, ids: list[str]) -> dict[str, Any]:
    async def one(job_id: str) -> float:
        t = time.perf_counter()
        conn = await asyncpg.connect(mesh.dsn(job_id), timeout=120)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        return (time.perf_counter() - t) * 1000

    results = await asyncio.gather(*(one(j) for j in ids), return_exceptions=True)
    ok = [r for r in results if isinstance(r, float)]
    errors = [str(r) for r in results if not isinstance(r, float)]
    return {"served": len(ok), "of": len(ids), "first_row_ms": summary(ok),
            "errors": errors[:5]}


async def _catalog_connections(catalog: Catalog) -> int:
    """Connections to the catalog database (this bench's pool among them)."""
    return int(await catalog.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"))


async def _settled(catalog: Catalog, timeout: float = 600) -> None:
    """Until no job is between states (the evictions' pauses have finished)."""
    deadline = time.monotonic() + timeout
    while any(j.state not in ("running", "paused") for j in await catalog.jobs()):
        if time.monotonic() > deadline:
            raise BenchError("jobs did not settle")
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)  # and the agents' first base backups are done


async def grow_catalog(catalog: Catalog, n: int) -> None:
    """n more jobs, as paused jobs that never ran (rows only: what the catalog holds)."""
    await catalog.pool.execute(
        "INSERT INTO jobs (id, state, desired_state, backend_password) "
        "SELECT 'cat-' || g, 'paused', 'paused', md5(g::text) FROM generate_series(1, $1) g", n)


async def run_mesh(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        inst, dsn = wm.start_catalog(stack, work)
        mesh = wm.start_mesh(stack, work / "state", dsn, wake_timeout=120, controller_args=(
            "--max-running", str(args.running), "--quiet-for", "1",
            "--health-interval", "2"))
        catalog = await Catalog.connect(dsn)
        try:
            await catalog.create_principal(wm.USER, scram_verifier(wm.PASSWORD))
            await catalog.grant(wm.USER, "*", "write")
            first = [f"s{i:04d}" for i in range(args.running)]
            more = [f"s{i:04d}" for i in range(args.running, args.running + args.storm)]
            say(f"creating {len(first)} jobs (no eviction) ...")
            t = time.perf_counter()
            out["create_ms"] = summary(await create_jobs(catalog, first))
            say(f"  {out['create_ms']} in {time.perf_counter() - t:.0f} s")
            await asyncio.sleep(2)  # quiet: every job evictable (--quiet-for 1)
            say(f"creating {len(more)} jobs, each evicting one ...")
            out["create_evicting_ms"] = summary(await create_jobs(catalog, more))
            say(f"  {out['create_evicting_ms']}")
            await _settled(catalog)
            running = sum(1 for j in await catalog.jobs() if j.state == "running")
            parts = mesh_pss(mesh, inst.postmaster_pid() if hasattr(inst, "postmaster_pid")
                             else None)
            total = sum(parts.values())
            out["mesh"] = {"running": running, "pss_mb": parts, "total_pss_mb": round(total, 1),
                           "pss_per_running_job_mb": round(total / max(running, 1), 2),
                           **process_counts(mesh), "fds_limit": _fd_limit()}
            idle_from = mesh_pss(mesh, None, cpu=True)
            await asyncio.sleep(10)
            idle_to = mesh_pss(mesh, None, cpu=True)
            out["mesh"]["idle_cpu_percent"] = {k: round((idle_to[k] - idle_from[k]) * 10, 1)
                                               for k in idle_to}
            say(f"mesh at {running} running: {out['mesh']}")
            paused = [j.id for j in await catalog.jobs() if j.state == "paused"][:args.storm]
            cpu_before = mesh_pss(mesh, None, cpu=True)
            say(f"storm: {len(paused)} paused jobs connected at once ...")
            t = time.perf_counter()
            out["storm"] = await storm(mesh, paused)
            await asyncio.sleep(1)
            cpu_after = mesh_pss(mesh, None, cpu=True)
            out["storm"]["wall_s"] = round(time.perf_counter() - t, 1)
            out["storm"]["cpu_s"] = {k: round(cpu_after[k] - cpu_before[k], 1)
                                     for k in cpu_after}
            say(f"  {out['storm']}")
            before = mesh_pss(mesh, None)
            conns_before = await _catalog_connections(catalog)
            extra = max(0, args.catalog_jobs - len(first) - len(more))
            await grow_catalog(catalog, extra)
            await asyncio.sleep(35)  # the controller's resync and the routers' reload
            after = mesh_pss(mesh, None)
            out["catalog"] = {"jobs": len(first) + len(more) + extra,
                              "before": len(first) + len(more),
                              "catalog_connections": [conns_before,
                                                      await _catalog_connections(catalog)],
                              "controller_mb": [before["controller"], after["controller"]],
                              "router_mb": [before["router"], after["router"]]}
            say(f"catalog of {out['catalog']['jobs']} jobs: {out['catalog']}")
        finally:
            await catalog.close()
    return out


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- 6. the neighbour ---------------------------------------------------------------------


async def neighbour(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from jobmesh.controller.backends.local.backend import LocalBackend
    from tests.support.local_jobs import making_jobs

    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        _inst, dsn = wm.start_catalog(stack, work / "n")
        catalog = await Catalog.connect(dsn)
        await catalog.migrate()
        try:
            for limited in (True, False):
                root = work / f"neighbour-{'limited' if limited else 'unlimited'}"
                root.mkdir(mode=0o755, exist_ok=True)
                store = work / "neighbour-store"
                store.mkdir(mode=0o755, exist_ok=True)
                b = LocalBackend(root, f"file://{store}", spares=0,
                                 job_cpu=None, job_memory=None, cgroups=limited)
                await b.start()
                try:
                    async with making_jobs(b, catalog, "n") as make:
                        a = await make()
                        burner = await make({"cpu": "500m"} if limited else {})
                        sa = await b.create(a, _quiet)
                        sb = await b.create(burner, _quiet)
                        url_a = (f"postgresql://job_owner:{a.backend_password}@127.0.0.1:"
                                 f"{sa.port}/{a.database}")
                        await asyncio.to_thread(_pgbench, url_a, ["-i", "-s", "1"])
                        alone = await asyncio.to_thread(_pgbench_p95, url_a, args)
                        burn = [asyncio.create_task(_burn(sb, burner)) for _ in range(4)]
                        await asyncio.sleep(1)
                        beside = await asyncio.to_thread(_pgbench_p95, url_a, args)
                        for t in burn:
                            t.cancel()
                        await asyncio.gather(*burn, return_exceptions=True)
                    key = "limited" if limited else "unlimited"
                    out[key] = {"alone_p95_ms": alone, "beside_p95_ms": beside,
                                "ratio": round(beside / alone, 2) if alone else None}
                    say(f"neighbour ({key}): A alone p95 {alone} ms, beside B {beside} ms")
                finally:
                    await b.agents.stop()
                    await b.close()
        finally:
            await catalog.close()
    return out


async def _quiet(_text: str) -> None:
    pass


async def _burn(started: Any, job: Any) -> None:
    conn = await asyncpg.connect(host=started.host, port=started.port, user="job_owner",
                                 password=job.backend_password, database=job.database)
    try:
        while True:
            await conn.fetchval("SELECT count(*) FROM generate_series(1, 3000000)")
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)


def _pgbench(url: str, extra: list[str]) -> str:
    proc = subprocess.run([str(bin_dir() / "pgbench"), *extra, url], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"pgbench failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout + proc.stderr


def _pgbench_p95(url: str, args: argparse.Namespace) -> float:
    """A's p95 latency (ms) at a fixed 100 transactions a second (select-only)."""
    log_dir = args.work / f"pgbench-{time.time_ns()}"
    log_dir.mkdir(parents=True)
    subprocess.run([str(bin_dir() / "pgbench"), "-S", "-R", "100", "-T",
                    f"{args.neighbour_seconds:g}", "-c", "2", "-l", "--log-prefix",
                    str(log_dir / "tx"), url], capture_output=True, text=True, timeout=600,
                   check=True)
    lat = [int(line.split()[2]) / 1000 for f in log_dir.glob("tx*")
           for line in f.read_text().splitlines() if len(line.split()) > 2]
    return pct(lat, 95) or 0.0


# --- report ----------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    a, m = data["agent"], data["mesh"]
    rows = [
        ("agent host spawn to serving, file:// (p50)",
         f"{a['file']['spawn_to_serving_ms']['p50']} ms", "150 ms"),
        ("agent host idle PSS, file:// / s3://",
         f"{a['file']['idle_pss_mb']} / {a['s3']['idle_pss_mb']} MB", "20 MB"),
        ("agent PSS per running job (host / running)",
         f"{round(m['mesh']['pss_mb']['agent_host'] / max(m['mesh']['running'], 1), 2)} MB",
         "20 MB"),
        (f"mesh PSS per running job at {m['mesh']['running']} running",
         f"{m['mesh']['pss_per_running_job_mb']} MB", ""),
        ("PostgreSQL processes per idle job", f"{m['mesh']['postgres_processes_per_job']}", ""),
        ("create p50 / p95, no eviction",
         f"{m['create_ms']['p50']} / {m['create_ms']['p95']} ms", ""),
        ("create p50 / p95, each evicting",
         f"{m['create_evicting_ms']['p50']} / {m['create_evicting_ms']['p95']} ms", ""),
        (f"wake storm of {m['storm']['of']} (served {m['storm']['served']}), first row p50 / p95",
         f"{m['storm']['first_row_ms']['p50']} / {m['storm']['first_row_ms']['p95']} ms",
         "p95 5000 ms"),
        (f"controller PSS, {m['catalog']['before']} -> {m['catalog']['jobs']} jobs in catalog",
         " -> ".join(f"{v} MB" for v in m["catalog"]["controller_mb"]), "flat"),
        ("router PSS, same", " -> ".join(f"{v} MB" for v in m["catalog"]["router_mb"]), "flat"),
        ("catalog connections, same (this bench's own pool among them)",
         " -> ".join(str(v) for v in m["catalog"].get("catalog_connections", [])), "flat"),
        ("idle CPU at that many running (% of one core): agent host / PostgreSQL / controller",
         " / ".join(str(m["mesh"]["idle_cpu_percent"][k])
                    for k in ("agent_host", "postgres", "controller")), ""),
    ]
    n = data.get("neighbour") or {}
    for key in ("limited", "unlimited"):
        if key in n:
            rows.append((f"neighbour A p95 alone -> beside B ({key})",
                         f"{n[key]['alone_p95_ms']} -> {n[key]['beside_p95_ms']} ms "
                         f"({n[key]['ratio']}x)", "1.5x" if key == "limited" else ""))
    lines = ["| measure | result | target |", "|---|---|---|"]
    lines += [f"| {a_} | {b_} | {c_} |" for a_, b_, c_ in rows]
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    parts = data["mesh"]["mesh"]["pss_mb"]
    left.bar(list(parts), list(parts.values()), color="#1f77b4")
    left.set_title(f"mesh PSS at {data['mesh']['mesh']['running']} running jobs (MB)")
    left.tick_params(axis="x", rotation=30)
    series = {"create": data["mesh"]["create_ms"], "create+evict":
              data["mesh"]["create_evicting_ms"], "storm first row":
              data["mesh"]["storm"]["first_row_ms"]}
    xs = range(len(series))
    right.bar([x - 0.2 for x in xs], [s["p50"] or 0 for s in series.values()], 0.4,
              label="p50")
    right.bar([x + 0.2 for x in xs], [s["p95"] or 0 for s in series.values()], 0.4,
              label="p95")
    right.axhline(5000, color="#d62728", linestyle="--", label="storm p95 target")
    right.set_xticks(list(xs), list(series))
    right.set_ylabel("ms")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work
    if work.exists():
        await asyncio.to_thread(shutil.rmtree, work, True)
    work.mkdir(parents=True, mode=0o755)
    work.chmod(0o755)
    from jobmesh.agent.postgres import give_to_postgres

    give_to_postgres(work)
    data: dict[str, Any] = {"machine": {"cores": CORES}, "args": {
        "catalog_jobs": args.catalog_jobs, "running": args.running, "storm": args.storm}}
    data["agent"] = await agent_alone(work)
    data["mesh"] = await run_mesh(args, work)
    data["neighbour"] = await neighbour(args, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data, args.out / "scale.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
