"""Benchmark the router's pooling against PgBouncer's, one and two processes each.

    .venv/bin/python bench/txpool.py [--rounds 3] [--duration 8] [--out bench/results]

One PostgreSQL 15 (pgbench scale 10). Four peers per scenario, run in
interleaved rounds (the starting peer rotates): PgBouncer, two PgBouncer
processes sharing the port (``so_reuseport``, PgBouncer's way to use two
cores), the router, and the router with ``--workers 2``. Scenarios:

- ``session_select``: session mode, ``pgbench -S``, 8 clients;
- ``tx_simple``, ``tx_extended``, ``tx_prepared``: transaction mode,
  ``pgbench -S`` with ``-M simple | extended | prepared``, 100 clients over a
  pool of 10 server connections per process.

Writes txpool.json and txpool.png to --out and prints a markdown table.
PgBouncer before 1.21 does not track prepared statements in transaction
mode: its ``tx_prepared`` runs fail, and are reported as failed, not hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import _peers
from _peers import BenchError
from proxy import THREADS, median, ratio, say
from proxy import raise_nofile as _raise_nofile

SCALE = 10
POOL = 10  # server connections per process, transaction mode
SCENARIOS: dict[str, dict[str, Any]] = {
    "session_select": {"mode": "session", "clients": 8, "flags": ["-S"]},
    "tx_simple": {"mode": "transaction", "clients": 100, "flags": ["-S", "-M", "simple"]},
    "tx_extended": {"mode": "transaction", "clients": 100, "flags": ["-S", "-M", "extended"]},
    "tx_prepared": {"mode": "transaction", "clients": 100, "flags": ["-S", "-M", "prepared"]},
}
PEERS = ["pgbouncer", "pgbouncer_x2", "router", "router_workers"]
LABELS = {"pgbouncer": "pgbouncer", "pgbouncer_x2": "pgbouncer x2 (so_reuseport)",
          "router": "router", "router_workers": "router --workers 2"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario")
    p.add_argument("--duration", type=int, default=8, help="seconds per pgbench run")
    p.add_argument("--out", type=Path, default=_peers.REPO / "bench" / "results")
    p.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="these scenarios")
    return p.parse_args(argv)


def tps(peer: _peers.Peer, flags: list[str], clients: int, duration: int) -> float:
    import re

    cmd = ["pgbench", *flags, "-c", str(clients), "-j", str(THREADS), "-T", str(duration),
           "-n", *_peers.conn_args(peer)]
    out = _peers.run_client(cmd, peer, timeout=duration + 120)
    m = re.search(r"^tps = ([\d.]+)", out, re.MULTILINE)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if m is None or (failed and int(failed.group(1))):
        raise BenchError(f"pgbench against {peer.name}: {out[-300:]!r}")
    return float(m.group(1))


def scenario(stack: contextlib.ExitStack, root: Path, pg: Any, name: str, spec: dict[str, Any],
             args: argparse.Namespace, errors: list[str]) -> dict[str, list[float | None]]:
    mode = spec["mode"]
    size = POOL if mode == "transaction" else 1100
    d = root / name
    d.mkdir()
    with contextlib.ExitStack() as peers_stack:
        servers = {
            "pgbouncer": _peers.start_pgbouncer(peers_stack, d, pg, name="pgbouncer",
                                                pool_mode=mode, pool_size=size),
            "pgbouncer_x2": _peers.start_pgbouncer(peers_stack, d, pg, name="pgbouncer_x2",
                                                   pool_mode=mode, pool_size=size,
                                                   processes=2),
            "router": _peers.start_router(peers_stack, d, pg, name="router", pool_mode=mode,
                                          pool_size=size),
            "router_workers": _peers.start_router(peers_stack, d, pg, workers=2,
                                                  name="router_workers", pool_mode=mode,
                                                  pool_size=size),
        }
        runs: dict[str, list[float | None]] = {p: [] for p in PEERS}
        for r in range(args.rounds):
            for peer in PEERS[r % len(PEERS):] + PEERS[:r % len(PEERS)]:
                server = servers[peer]
                try:
                    got: float | None = tps(server.peer, spec["flags"], spec["clients"],
                                            args.duration)
                except BenchError as exc:
                    got = None
                    errors.append(f"{name} round {r + 1} {peer}: {exc}")
                runs[peer].append(got)
                say(f"{name} round {r + 1}/{args.rounds} {peer}: {got} tps")
    return runs


def markdown(report: dict[str, Any]) -> str:
    lines = [f"pgbench -j {THREADS} -T {report['parameters']['duration_s']}, scale {SCALE}, "
             f"{report['parameters']['rounds']} interleaved rounds; median tps (every round)",
             "", "| scenario | " + " | ".join(LABELS[p] for p in PEERS)
             + " | router / pgbouncer | router --workers 2 / pgbouncer x2 |",
             "| --- |" + " ---: |" * (len(PEERS) + 2)]
    for name, runs in report["rounds_tps"].items():
        cells = []
        for p in PEERS:
            pts = ", ".join("err" if v is None else f"{v:.0f}" for v in runs[p])
            m = report["medians_tps"][name][p]
            cells.append(f"{'n/a' if m is None else f'{m:,.0f}'} ({pts})")
        rat = report["ratios"][name]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {rat['router_vs_pgbouncer']} | {rat['workers_vs_pgbouncer_x2']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rounds_tps"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.5), squeeze=False)
    colors = ["#1f77b4", "#aec7e8", "#ff9896", "#d62728"]
    for ax, name in zip(axes[0], names, strict=True):
        for i, p in enumerate(PEERS):
            ax.bar(i, report["medians_tps"][name][p] or 0, color=colors[i], alpha=0.7)
            pts = [v for v in report["rounds_tps"][name][p] if v is not None]
            ax.scatter([i] * len(pts), pts, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(PEERS)), ["pgb", "pgb x2", "router", "router w2"])
        ax.set_title(name)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("transactions/s")
    fig.suptitle("median tps, dots = rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        _peers.ensure_pgbouncer()
    except BenchError as exc:
        print(f"bench/txpool.py: cannot install pgbouncer: {exc}", file=sys.stderr)
        return 2
    _raise_nofile()
    errors: list[str] = []
    runs: dict[str, dict[str, list[float | None]]] = {}
    with contextlib.ExitStack() as stack:
        try:
            root = _peers.make_workdir(stack)
            say(f"starting PostgreSQL (pgbench scale {SCALE}) under {root}")
            pg, _direct = _peers.start_postgres(stack, root, SCALE)
            for name in args.only or SCENARIOS:
                runs[name] = scenario(stack, root, pg, name, SCENARIOS[name], args, errors)
            versions = _peers.versions(pg)
        except BenchError as exc:
            print(f"bench/txpool.py: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench/txpool.py: interrupted, stopping everything", file=sys.stderr)
            return 130
    medians = {n: {p: median(v) for p, v in r.items()} for n, r in runs.items()}
    report = {
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(), **versions},
        "parameters": {"rounds": args.rounds, "duration_s": args.duration, "threads": THREADS,
                       "scale": SCALE, "pool_per_process": POOL,
                       "scenarios": {n: SCENARIOS[n] for n in runs}},
        "rounds_tps": runs, "medians_tps": medians,
        "ratios": {n: {"router_vs_pgbouncer": ratio(m["router"], m["pgbouncer"]),
                       "workers_vs_pgbouncer_x2": ratio(m["router_workers"], m["pgbouncer_x2"]),
                       "workers_vs_pgbouncer": ratio(m["router_workers"], m["pgbouncer"])}
                   for n, m in medians.items()},
        "errors": errors,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "txpool.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "txpool.png")
    print(markdown(report))
    say(f"wrote {args.out / 'txpool.json'} and {args.out / 'txpool.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
