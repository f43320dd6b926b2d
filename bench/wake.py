"""Benchmark waking paused jobs and creating jobs, through the router, on real processes.

    .venv/bin/python bench/wake.py [--rounds 10] [--creates 20] [--sizes 10,100,1000]
    .venv/bin/python bench/wake.py --quick

A catalog PostgreSQL, ``jobmesh controller`` (local backend, file:// store) and
``jobmesh router --catalog-dsn`` run as subprocesses. One job per size gets a
table ``t`` of about 10 MB, 100 MB and 1 GB (written through the router), then:

1. **wake**: R times per size, pause the job (waiting for ``paused``), then time a
   client (asyncpg) from ``connect()`` through the router (``dbname=job_<id>``) to
   the first row of ``SELECT 1 FROM t LIMIT 1``; the controller's events say where
   the time went (wake request, controller pick-up, restore, start, router).
2. **floor**: the same PGDATA already restored on disk: ``pg_ctl start``, connect
   directly, first row.
3. **pgBackRest**: an offline full backup of the same PGDATA; ``restore`` into an
   empty directory, ``pg_ctl start``, connect directly, first row.
4. **create**: ``catalog.create_job`` to the first row of ``SELECT 1`` through the
   router, and the controller's own create duration (creating -> running).

Writes wake.json and wake.png to --out, prints a markdown table on stdout;
progress goes to stderr. Everything it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import _peers
import _wake_machine as machine
import _wake_mesh as wm
import _wake_peers as wp
import _wake_report as report
import asyncpg
from _backup_peers import ensure_pgbackrest, pgdata_bytes
from _peers import BenchError

from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.passwords import scram_verifier
from tests.support.waiting import until

CORES = os.cpu_count() or 1
ROW_BYTES = 141  # heap bytes per row of t (136-byte tuples + line pointer, 58 to a page)
FILL = ("CREATE TABLE t AS SELECT g, md5(g::text) AS a, md5((-g)::text) AS b,"
        " repeat('x', 40) AS c FROM generate_series(1, {rows}) g")
SETTLE = 0.5  # seconds of quiet (after a sync) before each timed sample


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10,
                   help="wakes per size (default 10); sizes of 1 GB and more get half")
    p.add_argument("--creates", type=int, default=20, help="jobs created (default 20)")
    p.add_argument("--sizes", default="10,100,1000",
                   help="MB of table data per job, comma-separated (default 10,100,1000)")
    p.add_argument("--no-pgbackrest", action="store_true", help="skip the pgBackRest peer")
    p.add_argument("--quick", action="store_true",
                   help="a check that everything works: 2 rounds, 3 creates, 10 and 100 MB")
    p.add_argument("--wake-timeout", type=float, default=600,
                   help="the router's --wake-timeout (default 600 s)")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="make the temp dir (catalog, state dir, store, copies) under DIR "
                   "(default /tmp); the postgres OS user must be able to enter it")
    p.add_argument("--out", type=Path, default=_peers.REPO / "bench" / "results")
    args = p.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: expected MB as whole numbers, e.g. 10,100,1000")
    if args.quick:
        args.rounds, args.creates, args.sizes = 2, 3, [s for s in args.sizes if s <= 100]
    if args.rounds < 1 or args.creates < 0 or not args.sizes or min(args.sizes) < 1:
        p.error("--rounds must be >= 1, --creates >= 0, --sizes at least one size >= 1 MB")
    return args


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def job_of(mb: int) -> str:
    return f"w{mb}mb"


def rounds_for(mb: int, rounds: int) -> int:
    return max(1, math.ceil(rounds / 2)) if mb >= 1000 else rounds


async def quiet() -> None:
    """Dirty pages of the last step written out, then a moment: each sample starts alike."""
    await asyncio.to_thread(os.sync)
    await asyncio.sleep(SETTLE)


# --- the jobs --------------------------------------------------------------------------------


async def make_jobs(catalog: Catalog, mesh: wm.Mesh, sizes: list[int]) -> dict[str, Any]:
    """One job per size, its table written through the router, then paused."""
    out: dict[str, Any] = {}
    for mb in sizes:
        job_id = job_of(mb)
        await catalog.create_job(job_id, {})
        await wm.wait_state(catalog, job_id, "running")
        rows = mb * 1_000_000 // ROW_BYTES
        started = time.perf_counter()
        conn = await asyncpg.connect(mesh.dsn(job_id), timeout=120)
        try:
            await conn.execute(FILL.format(rows=rows), timeout=3600)
            table = await conn.fetchval("SELECT pg_total_relation_size('t')")
        finally:
            await conn.close()
        fill_s = time.perf_counter() - started
        say(f"{job_id}: {rows:,} rows, table {table / 1e6:,.0f} MB in {fill_s:.1f} s; pausing")
        p = await wm.pause(catalog, job_id)
        say(f"{job_id}: paused in {p['ms'] / 1000:.1f} s")
        out[job_id] = {"mb": mb, "rows": rows, "table_bytes": table,
                       "fill_seconds": round(fill_s, 1), "first_pause": p}
    return out


# --- wakes -------------------------------------------------------------------------------------


async def wake_once(catalog: Catalog, mesh: wm.Mesh, job_id: str) -> dict[str, Any]:
    await quiet()
    before = await wm.last_event_id(catalog)
    load = machine.busy()
    fr = await wm.first_row(mesh.dsn(job_id), wp.SQL)
    events = await wm.events_since(catalog, job_id, before)
    requested = [e for e in events if e.kind == "wake-requested"]
    running = wm.transition(events, "running")
    return {
        "ms": round(fr.ms, 1), **load,
        "wake_requested_at_ms": wm.event_at(requested[-1] if requested else None, fr.started),
        "resuming_at_ms": wm.event_at(wm.transition(events, "resuming"), fr.started),
        "running_at_ms": wm.event_at(running, fr.started),
        "controller_ms": round(running.duration_ms, 1) if running and running.duration_ms
        else None,
        "bytes_restored": running.bytes if running else None,
        "laps_ms": wm.laps_of(running),
        "wal_replayed": (running.detail or {}).get("wal_replayed") if running else None,
        "source": (running.detail or {}).get("source", "store") if running else None,
    }


async def wake_rounds(catalog: Catalog, mesh: wm.Mesh, jobs: dict[str, Any], rounds: int,
                      errors: list[str]) -> tuple[dict[str, list[dict[str, Any]]],
                                                  dict[str, list[dict[str, Any]]]]:
    """Each round wakes every job twice: cold (its warm-cache entry dropped first, so the
    controller restores from the store, as on a machine that never ran the job) and
    warm (the entry its previous pause left, as a wake on the same machine finds it)."""
    warm: dict[str, list[dict[str, Any]]] = {j: [] for j in jobs}
    cold: dict[str, list[dict[str, Any]]] = {j: [] for j in jobs}
    pauses: dict[str, list[dict[str, Any]]] = {j: [] for j in jobs}
    for r in range(rounds):
        for job_id, info in jobs.items():
            if r >= rounds_for(info["mb"], rounds):
                continue
            for kind, samples in (("cold", cold), ("warm", warm)):
                try:
                    if kind == "cold":
                        await asyncio.to_thread(shutil.rmtree, mesh.state / "cache" / job_id,
                                                True)
                    s = await wake_once(catalog, mesh, job_id)
                    samples[job_id].append(s)
                    if "pgdata_bytes" not in info:
                        total, wal = await asyncio.to_thread(pgdata_bytes, mesh.pgdata(job_id))
                        info.update(pgdata_bytes=total, pg_wal_bytes=wal)
                    say(f"round {r + 1}/{rounds} {kind} wake {job_id} (from the "
                        f"{s['source']}): {s['ms']:,.0f} ms "
                        f"(controller {s['controller_ms'] or 0:,.0f} ms)")
                    pauses[job_id].append(await wm.pause(catalog, job_id))
                except BenchError:
                    raise
                except Exception as exc:  # one failed wake must not hide the others
                    errors.append(f"{kind} wake {job_id} round {r + 1}: "
                                  f"{type(exc).__name__}: {exc}")
                    say(errors[-1])
                    job = await catalog.job(job_id)
                    if job is not None and job.state != "paused":
                        await wm.pause(catalog, job_id)
    for job_id, info in jobs.items():
        info["pauses"] = pauses[job_id]
        snaps = await catalog.snapshots(job_id)
        if snaps:
            info.update(snapshot_bytes=snaps[-1]["size_bytes"],
                        stored_bytes=snaps[-1]["stored_bytes"])
    return warm, cold


# --- creates -------------------------------------------------------------------------------


async def create_rounds(catalog: Catalog, mesh: wm.Mesh, n: int,
                        errors: list[str]) -> list[dict[str, Any]]:
    """Create, first row through the router, delete; the template's spares refilled and the
    disk quiet before each create (a create on a busy machine is measured by the wakes)."""
    samples = []
    for i in range(n):
        job_id = f"new{i:02d}"
        try:
            await until(mesh.spares_ready, "the template's spare copies", timeout=60)
            await quiet()
            before = await wm.last_event_id(catalog)
            started, started_wall = time.perf_counter(), time.time()
            await catalog.create_job(job_id, {})
            inserted = time.perf_counter()
            fr = await wm.first_row(mesh.dsn(job_id), "SELECT 1", retry_unknown=True)
            events = await wm.events_since(catalog, job_id, before)
            running = wm.transition(events, "running")
            created = [e for e in events if e.kind == "created"]
            s = {"ms": round((fr.done_perf - started) * 1000, 1),
                 "create_job_ms": round((inserted - started) * 1000, 1),
                 "unknown_job_retries": fr.retries,
                 "created_at_ms": wm.event_at(created[-1] if created else None, started_wall),
                 "running_at_ms": wm.event_at(running, started_wall),
                 "controller_ms": round(running.duration_ms, 1) if running and
                 running.duration_ms else None,
                 "template": (running.detail or {}).get("template") if running else None,
                 "laps_ms": wm.laps_of(running)}
            samples.append(s)
            say(f"create {i + 1}/{n}: {s['ms']:,.0f} ms to the first row (controller "
                f"{s['controller_ms'] or 0:,.0f} ms, template {s['template']})")
        except BenchError:
            raise
        except Exception as exc:
            errors.append(f"create {job_id}: {type(exc).__name__}: {exc}")
            say(errors[-1])
        if await catalog.job(job_id) is not None:
            await catalog.set_desired(job_id, "deleted")
            await wm.wait_state(catalog, job_id, None, timeout=120)
    return samples


# --- the peers ------------------------------------------------------------------------------


async def peer_rounds(catalog: Catalog, mesh: wm.Mesh, root: Path, jobs: dict[str, Any],
                      rounds: int, with_pgbackrest: bool, instances: wp.Instances,
                      errors: list[str]) -> tuple[dict[str, list], dict[str, list], dict]:
    floor: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
    pgbr: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
    copies: dict[str, tuple[Any, wp.Direct]] = {}
    for job_id, info in jobs.items():
        job = await catalog.job(job_id)
        assert job is not None and job.state == "paused", job
        await quiet()
        started = time.perf_counter()
        jd = await wp.restore_copy(root / "floor", mesh.store_url, job_id)
        # The agent's restore of the same snapshot in this (otherwise idle) process: the
        # controller's restore step without the controller around it.
        info["agent_restore_in_bench_ms"] = round((time.perf_counter() - started) * 1000, 1)
        copies[job_id] = (jd, wp.Direct(job_id, job.backend_password))
    for job_id, info in jobs.items():
        jd, who = copies[job_id]
        for r in range(rounds_for(info["mb"], rounds)):
            floor[job_id].append(await wp.floor_round(jd, who, instances))
            say(f"round {r + 1} floor {job_id}: {floor[job_id][-1]['ms']:,.0f} ms")
    backups: dict[str, Any] = {}
    if not with_pgbackrest:
        return floor, pgbr, backups
    tool = wp.PgBackRest(root / "pgbackrest", CORES)
    tool.setup({j: copies[j][0].pgdata for j in jobs})
    for job_id in jobs:
        backups[job_id] = await asyncio.to_thread(tool.backup, job_id)
        say(f"pgBackRest offline backup of {job_id}: {backups[job_id]['seconds']} s, "
            f"{backups[job_id]['stored_bytes'] / 1e6:,.1f} MB stored")
    for job_id, info in jobs.items():
        for r in range(rounds_for(info["mb"], rounds)):
            try:
                s = await tool.wake_round(root / "pgbr-restore", job_id, copies[job_id][1],
                                          instances)
            except BenchError as exc:
                errors.append(f"pgbackrest {job_id} round {r + 1}: {exc}")
                say(errors[-1])
                continue
            pgbr[job_id].append(s)
            say(f"round {r + 1} pgBackRest {job_id}: {s['ms']:,.0f} ms "
                f"(restore {s['restore_ms']:,.0f} ms)")
    return floor, pgbr, backups


# --- main -----------------------------------------------------------------------------------


async def measure(mesh: wm.Mesh, root: Path, args: argparse.Namespace,
                  instances: wp.Instances) -> dict[str, Any]:
    errors: list[str] = []
    catalog = await Catalog.connect(mesh.catalog_dsn)
    try:
        await catalog.create_principal(wm.USER, scram_verifier(wm.PASSWORD))
        await catalog.grant(wm.USER, "*", "write")
        say(f"creating and filling jobs of {', '.join(f'{mb} MB' for mb in args.sizes)}")
        jobs = await make_jobs(catalog, mesh, args.sizes)
        say(f"{args.creates} creates")
        creates = await create_rounds(catalog, mesh, args.creates, errors)
        say(f"wakes: {args.rounds} rounds")
        wakes, cold_wakes = await wake_rounds(catalog, mesh, jobs, args.rounds, errors)
        say("the floor" + ("" if args.no_pgbackrest else " and pgBackRest"))
        floor, pgbr, backups = await peer_rounds(catalog, mesh, root, jobs, args.rounds,
                                                 not args.no_pgbackrest, instances, errors)
    finally:
        await catalog.close()
    return {"jobs": jobs, "wake": wakes, "wake_cold": cold_wakes, "floor": floor,
            "pgbackrest": pgbr,
            "pgbackrest_backups": backups, "create": creates, "errors": errors}


def run(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    root = machine.make_workdir(stack, args.workdir)
    # Last before the directory goes (callbacks run in reverse): whatever is left of ours
    # once everything was stopped properly (a pgbackrest killed mid-restore, say).
    stack.callback(wm.kill_processes_mentioning, str(root) + "/")
    load_before, create_before = machine.busy(), machine.file_create_ms(root)
    say(f"starting the catalog, controller and router under {root}")
    _catalog_pg, dsn = wm.start_catalog(stack, root)
    mesh = wm.start_mesh(stack, root / "mesh", dsn, args.wake_timeout)
    instances = wp.Instances()
    stack.callback(instances.stop_all)
    started = time.monotonic()
    results = asyncio.run(measure(mesh, root, args, instances))
    return {
        "machine": {**machine.describe(CORES), "workdir_fs": machine.filesystem(root),
                    "busy_before": load_before, "busy_after": machine.busy(),
                    "file_create_1300_ms": {"before": create_before,
                                            "after": machine.file_create_ms(root)}},
        "parameters": {
            "rounds": args.rounds, "rounds_1gb": rounds_for(1000, args.rounds),
            "creates": args.creates, "sizes_mb": args.sizes, "quick": args.quick,
            "fill": FILL.format(rows="N"), "first_row_sql": wp.SQL,
            "client": "asyncpg, SCRAM through the router as a user with write access",
            "store": "file:// on the local disk", "catalog": "PostgreSQL 15, default settings",
            "controller": "--idle-timeout 0, local backend, 2 template spares",
            "settle": f"os.sync() and {SETTLE} s before each sample",
            "pgbackrest": "offline full backup (--no-online), compress-type=zst, "
                          f"process-max={CORES}; restore type none",
        },
        "wall_seconds": round(time.monotonic() - started),
        **results,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if not args.no_pgbackrest:
        try:
            ensure_pgbackrest()
        except BenchError as exc:
            print(f"bench/wake.py: cannot install pgbackrest: {exc}", file=sys.stderr)
            return 2
    stack = contextlib.ExitStack()
    try:
        data = run(stack, args)
    except BenchError as exc:
        print(f"bench/wake.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/wake.py: interrupted, stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("stopping everything")
        stack.close()
    data.update(report.summarize(data))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wake.json").write_text(json.dumps(data, indent=2) + "\n")
    report.plot(data, args.out / "wake.png")
    print(report.markdown(data))
    say(f"wrote {args.out / 'wake.json'} and {args.out / 'wake.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
