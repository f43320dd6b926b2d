"""Benchmark what the store keeps over many pauses, and a wake storm with evictions.

    .venv/bin/python bench/store_soak.py [--pauses 272] [--storm-jobs 150] [--running 40]
    .venv/bin/python bench/store_soak.py --quick

A catalog PostgreSQL, ``jobmesh controller`` (local backend, file:// store, its
own retention and garbage collection as configured by default: 3 pause
snapshots, a 24 h point-in-time window) and ``jobmesh router`` run as
subprocesses (bench/_wake_mesh.py).

1. **soak**: one small job is woken through the router, written to (one row),
   and paused, ``--pauses`` times. Then one collection runs (what ``jobmesh
   store gc`` does) and the store is measured: the job's unique object bytes
   (referenced by no other job's snapshots: the template's are shared), one
   snapshot's worth (the stored bytes of every object its newest snapshot
   references, shared ones included), its WAL, and whether every kept snapshot
   restores (each is restored, verified object by object, into a scratch
   directory).
2. **storm** (a second mesh, ``--max-running R``): ``--storm-jobs`` jobs are
   created (each beyond R evicts an idle one), then R paused jobs are connected
   to at once through the router, each wake evicting one of the R running:
   the time from connect() to the first row, p50 and p95.

Writes store_soak.json to --out and prints a markdown table; progress on stderr.
Everything it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _peers
import _wake_machine as machine
import _wake_mesh as wm
import asyncpg
from _peers import BenchError

from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.passwords import scram_verifier


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def execute(dsn: str, sql: str) -> None:
    """One statement through the router (a job created a moment ago may not be routed yet:
    its 3D000 is retried for a while)."""
    for _ in range(1000):
        try:
            conn = await asyncpg.connect(dsn, timeout=600)
            break
        except asyncpg.InvalidCatalogNameError:
            await asyncio.sleep(0.01)
    else:
        raise BenchError(f"{dsn}: the router never knew the job")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pause_steps(log: Path, job: str) -> dict[str, float]:
    """The median of each step of the controller's pauses of ``job``, from its log (``pause
    of job J: snapshot S in T ms (agent pause A ms, confirm C ms, ...)``)."""
    per: dict[str, list[float]] = {}
    for line in log.read_text().splitlines():
        m = re.search(rf"pause of job {job}: snapshot \S+ in [\d.]+ ms \((.*)\)", line)
        if m:
            for part in m.group(1).split(", "):
                name, _, _unit = part.rpartition(" ")
                name, _, value = name.rpartition(" ")
                with contextlib.suppress(ValueError):
                    per.setdefault(name, []).append(float(value))
    return {k: statistics.median(v) for k, v in per.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def soak(mesh: wm.Mesh, pauses: int, scratch: Path) -> dict[str, Any]:
    # here, not at the top: the storm alone also runs on a checkout without the collector
    from jobmesh.agent.cas.objects import name_of_key
    from jobmesh.agent.manifest import Manifest, snapshot_manifest_key
    from jobmesh.agent.restore import restore
    from jobmesh.agent.store import get_bytes, open_store
    from jobmesh.controller.storage.gc import Collector, usage
    from jobmesh.controller.storage.retention import Retention
    from jobmesh.defaults import KEEP_PAUSES

    catalog = await Catalog.connect(mesh.catalog_dsn)
    try:
        await catalog.create_principal(wm.USER, scram_verifier(wm.PASSWORD))
        await catalog.grant(wm.USER, "*", "write")
        await catalog.create_job("soak")
        await wm.wait_state(catalog, "soak", "running")
        dsn = mesh.dsn("soak")
        await execute(dsn, "CREATE TABLE t (id serial PRIMARY KEY, filler text)")
        conn_sql = "INSERT INTO t (filler) VALUES (repeat('x', 200)) RETURNING id"
        pause_ms: list[float] = []
        wake_ms: list[float] = []
        started = time.monotonic()
        for i in range(pauses):
            wake_ms.append((await wm.first_row(dsn, conn_sql)).ms)
            pause_ms.append((await wm.pause(catalog, "soak"))["ms"])
            if (i + 1) % 25 == 0:
                say(f"soak: {i + 1} pauses ({time.monotonic() - started:,.0f} s)")
    finally:
        await catalog.close()
    steps = pause_steps(mesh.state / "jobmesh.controller.log", "soak")
    store = open_store(mesh.store_url)
    try:
        collector = Collector(store)
        report = await collector.collect({}, default=Retention())
        use = (await usage(collector))["soak"]
        everything = await store.list("")
        sizes = {n: o.size for o in everything if (n := name_of_key(o.key)) is not None}
        ids = sorted({o.key.split("/")[2] for o in everything
                      if o.key.startswith("soak/snapshots/") and o.key.endswith("manifest.json")})
        newest = Manifest.from_json(await get_bytes(store, snapshot_manifest_key("soak", ids[-1])))
        one_snapshot = sum(sizes.get(n, 0) for n in newest.object_names())
        wal = [o for o in everything if o.key.startswith("soak/wal/")]
        restored = []
        for sid in ids:
            target = scratch / f"restore-{sid}"
            result = await restore(target, store, "soak", snapshot_id=sid)
            restored.append({"id": sid, "kind": result.manifest.kind,
                             "bytes_written": result.bytes_restored})
    finally:
        await store.close()
    return {
        "pauses": pauses,
        "pause_ms": {"p50": statistics.median(pause_ms), "p95": percentile(pause_ms, 0.95)},
        "pause_steps_p50_ms": steps,
        "wake_ms": {"p50": statistics.median(wake_ms), "p95": percentile(wake_ms, 0.95)},
        "kept_snapshots": len(ids), "kept": restored,
        "gc": report.as_dict(),
        "job_unique_bytes": use.unique, "job_shared_bytes": use.shared,
        "one_snapshot_bytes": one_snapshot,
        "bound_bytes": (KEEP_PAUSES + 1) * one_snapshot,
        "wal_bytes": sum(o.size for o in wal), "wal_objects": len(wal),
        "store_objects_bytes": sum(sizes.values()),
    }


async def storm(mesh: wm.Mesh, jobs: int, running: int) -> dict[str, Any]:
    catalog = await Catalog.connect(mesh.catalog_dsn)
    try:
        await catalog.create_principal(wm.USER, scram_verifier(wm.PASSWORD))
        await catalog.grant(wm.USER, "*", "write")
        ids = [f"s{i:03d}" for i in range(jobs)]
        started = time.monotonic()
        for n, job_id in enumerate(ids):
            await catalog.create_job(job_id)
            await wm.wait_state(catalog, job_id, "running", timeout=600)
            await execute(mesh.dsn(job_id), "CREATE TABLE t AS SELECT g FROM "
                          "generate_series(1, 1000) g")
            if (n + 1) % 25 == 0:
                say(f"storm: {n + 1} jobs created ({time.monotonic() - started:,.0f} s)")
        states = {j.id: j.state for j in await catalog.jobs()}
        paused = [j for j in ids if states.get(j) == "paused"]
        up = [j for j in ids if states.get(j) == "running"]
        say(f"storm: {len(up)} running, {len(paused)} paused; waking {running} at once")
        wanted = paused[:running]
        results = await asyncio.gather(*(wm.first_row(mesh.dsn(j), "SELECT 1 FROM t LIMIT 1",
                                                      timeout=900) for j in wanted))
    finally:
        await catalog.close()
    ms = [r.ms for r in results]
    return {"jobs": jobs, "max_running": running, "woken": len(wanted),
            "running_before": len(up), "first_row_ms": {
                "p50": statistics.median(ms), "p95": percentile(ms, 0.95), "max": max(ms),
                "samples": sorted(round(m) for m in ms)}}


def run(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    root = machine.make_workdir(stack, args.workdir)
    stack.callback(wm.kill_processes_mentioning, str(root) + "/")
    out: dict[str, Any] = {"machine": machine.describe(os.cpu_count() or 1),
                           "load_before": machine.busy()}
    _, dsn = wm.start_catalog(stack, root)
    if args.pauses:
        say(f"soak: {args.pauses} pauses of one small job")
        mesh = wm.start_mesh(stack, root / "soak", dsn, 600)
        out["soak"] = asyncio.run(soak(mesh, args.pauses, root / "scratch"))
        mesh.stop()
    if args.storm_jobs:
        say(f"storm: {args.storm_jobs} jobs, --max-running {args.running}")
        _, dsn2 = wm.start_catalog(stack, root / "c2")
        mesh = wm.start_mesh(stack, root / "storm", dsn2, 900,
                             ("--max-running", str(args.running), "--quiet-for", "0"))
        out["storm"] = asyncio.run(storm(mesh, args.storm_jobs, args.running))
        mesh.stop()
    out["load_after"] = machine.busy()
    return out


def table(data: dict[str, Any]) -> str:
    lines = ["| measure | value |", "|---|---|"]
    if s := data.get("soak"):
        mb = 1e6
        lines += [
            f"| pauses | {s['pauses']} |",
            f"| pause p50 / p95 | {s['pause_ms']['p50']:,.0f} / {s['pause_ms']['p95']:,.0f} ms |",
            f"| wake p50 / p95 (warm cache) | {s['wake_ms']['p50']:,.0f} / "
            f"{s['wake_ms']['p95']:,.0f} ms |",
            f"| snapshots kept (all restore) | {s['kept_snapshots']} "
            f"({'yes' if len(s['kept']) == s['kept_snapshots'] else 'no'}) |",
            f"| job's unique object bytes | {s['job_unique_bytes'] / mb:,.2f} MB |",
            f"| bound: (K + 1) x one snapshot's worth | {s['bound_bytes'] / mb:,.2f} MB "
            f"({s['one_snapshot_bytes'] / mb:,.2f} MB each) |",
            f"| WAL kept for the window | {s['wal_bytes'] / mb:,.2f} MB in "
            f"{s['wal_objects']} objects |",
            f"| whole store's objects | {s['store_objects_bytes'] / mb:,.2f} MB |"]
    if t := data.get("storm"):
        f = t["first_row_ms"]
        lines += [f"| storm: {t['woken']} wakes, {t['jobs']} jobs, max running "
                  f"{t['max_running']} | p50 {f['p50'] / 1000:,.1f} s, p95 "
                  f"{f['p95'] / 1000:,.1f} s |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pauses", type=int, default=272, help="soak pauses (0: no soak)")
    p.add_argument("--storm-jobs", type=int, default=150, help="storm jobs (0: no storm)")
    p.add_argument("--running", type=int, default=40, help="the storm's --max-running")
    p.add_argument("--quick", action="store_true", help="20 pauses; 12 jobs, 4 running")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, default=_peers.REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.pauses, args.storm_jobs, args.running = 20, 12, 4
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with contextlib.ExitStack() as stack:
            data = run(stack, args)
    except BenchError as exc:
        say(f"store_soak: {exc}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store_soak.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
