"""Benchmark the jobmesh router against PgBouncer and direct PostgreSQL.

    .venv/bin/python bench/proxy.py [--rounds 5] [--duration 10] [--out bench/results]

One PostgreSQL 15 (pgbench scale 10) with the router and PgBouncer (session
mode) in front of it. Measures select-only throughput (pgbench -S), the
new-connection rate (pgbench -S -C), both in interleaved rounds, and the
resident memory each proxy spends per idle session (1000 held open). Writes
proxy.json and proxy.png to --out and prints a markdown table on stdout.
Progress goes to stderr. Everything it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _peers
import asyncpg
from _peers import BenchError, Peer, Server

from jobmesh.agent.postgres import Instance

IDLE_SESSIONS = 1000
CLIENTS, THREADS, SCALE = 8, 2, 10
MODES = {"select_only": ["-S"], "connect": ["-S", "-C"]}
TARGET_RATIO, TARGET_KB = 1.0, 16.0
WORKERS = os.cpu_count() or 1  # the multi-process router runs one worker per core
PEERS = ["direct", "pgbouncer", "router", "router_workers"]
LABELS = {"direct": "direct", "pgbouncer": "pgbouncer", "router": "router",
          "router_workers": f"router --workers {WORKERS}"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per mode")
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    p.add_argument("--out", type=Path, default=_peers.REPO / "bench" / "results")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- throughput ---------------------------------------------------------------


def pgbench_tps(peer: Peer, flags: list[str], duration: int) -> float:
    cmd = ["pgbench", *flags, "-c", str(CLIENTS), "-j", str(THREADS), "-T", str(duration), "-n",
           *_peers.conn_args(peer)]
    out = _peers.run_client(cmd, peer, timeout=duration + 120)
    m = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    if m is None:
        raise BenchError(f"pgbench against {peer.name}: no tps in output: {out[-300:]!r}")
    return float(m.group(1))


def throughput(peers: list[Peer], flags: list[str], rounds: int, duration: int,
               errors: list[str]) -> dict[str, list[float | None]]:
    """Each round runs every peer once; the starting peer rotates from round to round."""
    runs: dict[str, list[float | None]] = {p.name: [] for p in peers}
    for r in range(rounds):
        for peer in peers[r % len(peers):] + peers[:r % len(peers)]:
            try:
                tps: float | None = pgbench_tps(peer, flags, duration)
            except BenchError as exc:
                tps = None
                errors.append(f"pgbench {' '.join(flags)} round {r + 1}: {exc}")
            runs[peer.name].append(tps)
            say(f"pgbench {' '.join(flags)} round {r + 1}/{rounds} {peer.name}: {tps} tps")
    return runs


# --- memory ---------------------------------------------------------------------


async def _open(peer: Peer, n: int, parallel: int = 32) -> list[asyncpg.Connection]:
    """n sessions, each with one query run so a session-mode pooler binds a server to it."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> asyncpg.Connection:
        async with gate:
            conn = await asyncpg.connect(host=peer.host, port=peer.port, user=peer.user,
                                         password=peer.password, database=peer.dbname,
                                         ssl=False, timeout=60)
            await conn.execute("SELECT 1")
            return conn

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    conns = [c for c in results if isinstance(c, asyncpg.Connection)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await _close(conns)
        raise BenchError(f"{peer.name}: {len(failed)} of {n} sessions failed to open, "
                         f"first: {type(failed[0]).__name__}: {failed[0]}")
    return conns


async def _close(conns: list[asyncpg.Connection]) -> None:
    await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)


async def _idle_memory(server: Server, n: int, backends: Callable[[], int]) -> dict[str, float]:
    await _close(await _open(server.peer, 50))  # warm up code paths and buffers first
    await asyncio.sleep(1)
    before = server.rss_kb()
    conns = await _open(server.peer, n)
    await asyncio.sleep(1)
    after = server.rss_kb()
    held = await asyncio.to_thread(backends)  # proof each session really holds a backend
    await _close(conns)
    return {"sessions": n, "rss_before_kb": before, "rss_after_kb": after,
            "kb_per_session": round((after - before) / n, 2), "postgres_backends_held": held}


def idle_memory(server: Server, pg: Instance, n: int = IDLE_SESSIONS) -> dict[str, float]:
    def backends() -> int:
        return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity "
                           f"WHERE datname = '{_peers.DATABASE}'"))

    result = asyncio.run(_idle_memory(server, n, backends))
    say(f"{server.peer.name}: {result}")
    return result


# --- report ---------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return round(statistics.median(ok), 1) if ok else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(runs: dict[str, dict[str, list[float | None]]],
              memory: dict[str, dict[str, float]]) -> dict[str, Any]:
    medians = {mode: {peer: median(v) for peer, v in per.items()} for mode, per in runs.items()}
    ratios = {
        mode: {"router_vs_pgbouncer": ratio(m["router"], m["pgbouncer"]),
               "router_vs_direct": ratio(m["router"], m["direct"]),
               "router_workers_vs_pgbouncer": ratio(m["router_workers"], m["pgbouncer"]),
               "router_workers_vs_direct": ratio(m["router_workers"], m["direct"])}
        for mode, m in medians.items()
    }
    # The target is judged on the router as deployed on a machine of its own:
    # one worker per core. The single-process figure is reported beside it.
    sel = ratios["select_only"]["router_workers_vs_pgbouncer"]
    kb = memory["router"]["kb_per_session"]
    targets = {
        "select_only_ratio_vs_pgbouncer": {"value": sel, "target": f">= {TARGET_RATIO}",
                                           "router": f"--workers {WORKERS}",
                                           "met": sel is not None and sel >= TARGET_RATIO},
        "router_kb_per_idle_session": {"value": kb, "target": f"<= {TARGET_KB:g}",
                                       "met": kb <= TARGET_KB},
    }
    return {"medians_tps": medians, "ratios": ratios, "targets": targets}


def markdown(report: dict[str, Any]) -> str:
    med, rounds = report["medians_tps"], report["rounds_tps"]
    mem, rat = report["memory"], report["ratios"]

    def cell(mode: str, peer: str) -> str:
        pts = ", ".join("err" if v is None else f"{v:.0f}" for v in rounds[mode][peer])
        m = med[mode][peer]
        return f"{'n/a' if m is None else f'{m:,.0f}'} ({pts})"

    p = report["parameters"]
    lines = [
        f"pgbench -c {p['clients']} -j {p['threads']} -T {p['duration_s']}, scale {p['scale']}, "
        f"{p['rounds']} interleaved rounds; median tps (every round)",
        "",
        "| peer | select-only (-S) | new connection each tx (-S -C) | KB per idle session |",
        "| --- | ---: | ---: | ---: |",
    ]
    for peer in PEERS:
        kb = f"{mem[peer]['kb_per_session']:.1f}" if peer in mem else "-"
        lines.append(f"| {LABELS[peer]} | {cell('select_only', peer)} | {cell('connect', peer)} "
                     f"| {kb} |")
    for key, label in (("router_vs_pgbouncer", "router / pgbouncer"),
                       ("router_workers_vs_pgbouncer", f"{LABELS['router_workers']} / pgbouncer"),
                       ("router_vs_direct", "router / direct"),
                       ("router_workers_vs_direct", f"{LABELS['router_workers']} / direct")):
        lines.append(f"| {label} | {rat['select_only'][key]} | {rat['connect'][key]} | |")
    lines.append("")
    for name, t in report["targets"].items():
        lines.append(f"- {name} = {t['value']} (target {t['target']}): "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = PEERS
    colors = {"direct": "#7f7f7f", "pgbouncer": "#1f77b4", "router": "#ff9896",
              "router_workers": "#d62728"}
    titles = {"select_only": "select-only (pgbench -S)", "connect": "new connection (-S -C)"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, mode in zip(axes, ("select_only", "connect"), strict=True):
        for i, peer in enumerate(peers):
            m = report["medians_tps"][mode][peer] or 0
            ax.bar(i, m, color=colors[peer], alpha=0.6, width=0.6)
            pts = [v for v in report["rounds_tps"][mode][peer] if v is not None]
            xs = [i - 0.15 + 0.3 * k / max(len(pts) - 1, 1) for k in range(len(pts))]
            ax.scatter(xs, pts, color="black", s=12, zorder=3)
        medians = [report["medians_tps"][mode][p] or 0 for p in peers]
        ax.set_xticks(range(len(peers)), [f"{LABELS[p]}\n{m:,.0f}"
                                          for p, m in zip(peers, medians, strict=True)])
        ax.set_title(titles[mode])
        ax.set_ylabel("transactions/s")
        ax.set_ylim(bottom=0)
    p = report["parameters"]
    fig.suptitle(f"median tps, dots = rounds ({p['rounds']} x {p['duration_s']}s, "
                 f"-c {p['clients']} -j {p['threads']}, {report['machine']['nproc']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -----------------------------------------------------------------------


def run(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    root = _peers.make_workdir(stack)
    say(f"starting PostgreSQL and loading pgbench scale {SCALE} under {root}")
    pg, direct = _peers.start_postgres(stack, root, SCALE)
    router = _peers.start_router(stack, root, pg)
    router_workers = _peers.start_router(stack, root, pg, workers=WORKERS, name="router_workers")
    pgbouncer = _peers.start_pgbouncer(stack, root, pg)
    say(f"postgres :{pg.port}, router :{router.peer.port}, "
        f"router --workers {WORKERS} :{router_workers.peer.port}, "
        f"pgbouncer :{pgbouncer.peer.port}")
    peers = [direct, pgbouncer.peer, router.peer, router_workers.peer]
    errors: list[str] = []
    runs = {mode: throughput(peers, flags, args.rounds, args.duration, errors)
            for mode, flags in MODES.items()}
    memory = {"router": idle_memory(router, pg), "pgbouncer": idle_memory(pgbouncer, pg)}
    report: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    **_peers.versions(pg)},
        "parameters": {"rounds": args.rounds, "duration_s": args.duration, "clients": CLIENTS,
                       "threads": THREADS, "scale": SCALE, "idle_sessions": IDLE_SESSIONS,
                       "router_workers": WORKERS,
                       "pgbouncer_pool_mode": "session", "order": "rotating per round"},
        "rounds_tps": runs,
        "memory": memory,
        **summarize(runs, memory),
        "errors": errors,
        "router_log_warnings": [ln for ln in router.log + router_workers.log
                                if '"level": "warning"' in ln or '"level": "error"' in ln],
    }
    return report


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _peers.ensure_pgbouncer()
    except BenchError as exc:
        print(f"bench/proxy.py: cannot install pgbouncer: {exc}", file=sys.stderr)
        return 2
    raise_nofile()
    stack = contextlib.ExitStack()
    try:
        report = run(stack, args)
    except BenchError as exc:
        print(f"bench/proxy.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/proxy.py: interrupted, stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proxy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "proxy.png")
    print(markdown(report))
    say(f"wrote {args.out / 'proxy.json'} and {args.out / 'proxy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
