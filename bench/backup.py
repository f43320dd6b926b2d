"""Benchmark jobmesh snapshots, restores and WAL pushes against pgBackRest.

    .venv/bin/python bench/backup.py [--rounds 3] [--scale 50] [--wal-segments 20]

One PostgreSQL 15 with a pgbench database (scale 50, about 750 MB). In R
interleaved rounds (the starting tool rotates each round) it takes a full
backup with each tool and restores each backup into an empty directory:

- pgBackRest: ``backup --type=full`` of the running cluster (compress-type=zst,
  process-max = cores, start-fast) into a posix repository, and ``restore``.
- jobmesh: ``agent.snapshot.take_snapshot`` of the cleanly stopped cluster to a
  ``file://`` store and to moto's S3 server, and ``agent.restore.restore``.

Then it times pushing real 16 MiB WAL segments from the load, one by one:
``agent.wal.push_segment`` (file:// and S3, in one process), ``jobmesh agent
wal-push`` (a process per segment) and ``pgbackrest archive-push`` (a process
per segment, as archive_command). Writes backup.json and backup.png to --out
and prints a markdown table on stdout; progress goes to stderr. Everything it
starts is stopped on exit, Ctrl-C included.

Over ~400 lines on purpose: one benchmark run top to bottom (set-up, interleaved
rounds, report); the peers' own code lives in bench/_backup_peers.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _backup_peers as peers
import _peers
from _peers import BenchError

from jobmesh.agent.postgres import Instance, free_port, give_to_postgres

CORES = os.cpu_count() or 1
BACKUP_TOOLS = ["pgbackrest", "jobmesh_file", "jobmesh_s3"]
WAL_TOOLS = ["pgbackrest", "jobmesh_file", "jobmesh_s3", "jobmesh_cli_file"]
LABELS = {"pgbackrest": "pgBackRest (posix repo)", "jobmesh_file": "jobmesh file://",
          "jobmesh_s3": "jobmesh s3:// (moto)", "jobmesh_cli_file": "jobmesh CLI file://"}
MEASURES = {
    "mb_per_s": "bytes of all files in the stopped PGDATA (pg_wal included) / wall seconds",
    "backup pgbackrest": "backup --type=full of the running cluster: checkpoint (start-fast), "
                         "copy+zst+checksum of data files (not pg_wal), wait for the WAL to be "
                         "archived, manifest, expire",
    "backup jobmesh": "take_snapshot of the cleanly stopped cluster: tar of PGDATA (without "
                      "recycled WAL) through zstd-3, upload, manifest; the stop is not timed",
    "restore pgbackrest": "restore --type=immediate into an empty dir (fsyncs every file); "
                          "WAL replay at first start not timed",
    "restore jobmesh": "restore: download, sha256 check while unpacking (no fsync)",
    "wal": "one segment at a time; pgbackrest archive-push and the jobmesh CLI start a process "
           "per segment, push_segment runs in one process",
}
COLORS = {"pgbackrest": "#1f77b4", "jobmesh_file": "#d62728", "jobmesh_s3": "#ff9896",
          "jobmesh_cli_file": "#9467bd"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--scale", type=int, default=50, help="pgbench scale (default 50, ~750 MB)")
    p.add_argument("--wal-segments", type=int, default=20,
                   help="WAL segments each tool pushes per round (default 20)")
    p.add_argument("--out", type=Path, default=_peers.REPO / "bench" / "results")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotated(items: list[str], r: int) -> list[str]:
    return items[r % len(items):] + items[:r % len(items)]




def backup_rounds(tools: peers.Tools, rounds: int, errors: list[str]) -> tuple[dict, list[Path]]:
    """R rounds: every tool backs up, then every tool restores; returns the per-round
    results and the last round's restored directories (kept for the content check)."""
    results: dict[str, dict[str, list[dict[str, float] | None]]] = {
        "backup": {t: [] for t in BACKUP_TOOLS}, "restore": {t: [] for t in BACKUP_TOOLS}}
    kept: dict[str, Path] = {}
    for r in range(rounds):
        peers.ensure(tools.inst, running=False)
        size, wal = peers.pgdata_bytes(tools.inst.datadir)
        for op in ("backup", "restore"):
            for tool in rotated(BACKUP_TOOLS, r):
                target = tools.root / f"restore-{tool}-{r}"
                load_before = round(os.getloadavg()[0], 2)  # other work on the machine shows here
                try:
                    res: dict[str, float] | None = (tools.backup(tool) if op == "backup"
                                                    else tools.restore(tool, target))
                    assert res is not None
                    res.update(pgdata_bytes=size, pgdata_wal_bytes=wal, loadavg_1m=load_before,
                               mb_per_s=round(size / res["seconds"] / 1e6, 1))
                except Exception as exc:  # one failed step must not hide the others
                    res = None
                    errors.append(f"{op} {tool} round {r + 1}: {type(exc).__name__}: {exc}")
                results[op][tool].append(res)
                say(f"round {r + 1}/{rounds} {op} {tool}: "
                    + (f"{res['seconds']:.2f} s, {res['mb_per_s']} MB/s" if res else "FAILED"))
                if op == "restore" and r == rounds - 1 and res is not None:
                    kept[tool] = target
                elif op == "restore":
                    shutil.rmtree(target, ignore_errors=True)
                    tools.forget(tool)
    return results, [kept.get(t) for t in BACKUP_TOOLS]


def check_restores(inst: Instance, dirs: list[Path | None], expected: str) -> dict[str, str]:
    """Start each restored cluster (archiving off) and compare its data with the source."""
    out = {}
    for tool, d in zip(BACKUP_TOOLS, dirs, strict=True):
        if d is None:
            out[tool] = "not restored"
            continue
        copy = Instance(d, port=free_port(), settings={"fsync": "off", "archive_mode": "off"})
        try:
            give_to_postgres(d)
            peers.start_instance(copy)
            got = peers.content(copy)
            out[tool] = "identical" if got == expected else f"DIFFERENT: {got}"
        except Exception as exc:
            out[tool] = f"check failed: {exc}"
        finally:
            copy.stop_quietly()
        say(f"restored by {tool}: {out[tool]}")
    return out


# --- WAL push -------------------------------------------------------------------------------


def pick_segments(walpool: Path, n: int) -> list[Path]:
    """n of the load's archived segments, spread evenly over it."""
    names = sorted(p for p in walpool.iterdir() if len(p.name) == 24)
    if len(names) < n:
        raise BenchError(f"the load archived only {len(names)} WAL segments, {n} wanted")
    return [names[i * len(names) // n] for i in range(n)]


def wal_rounds(tools: peers.Tools, segments: list[Path], rounds: int,
               errors: list[str]) -> dict[str, list[float]]:
    """Per-segment push latency in ms, every tool, R rounds (a fresh archive each round)."""
    from jobmesh.agent.wal import push_segment

    out: dict[str, list[float]] = {t: [] for t in WAL_TOOLS}
    for r in range(rounds):
        tools.pgbr.wipe_wal_archive()
        for tool in rotated(WAL_TOOLS, r):
            job = f"wal-r{r}-{tool.replace('_', '-')}"  # new names: every push uploads
            try:
                if tool == "pgbackrest":
                    for seg in segments:
                        started = time.perf_counter()
                        tools.pgbr.run(f"--stanza={peers.WAL_STANZA}", "archive-push", str(seg))
                        out[tool].append((time.perf_counter() - started) * 1e3)
                elif tool == "jobmesh_cli_file":
                    for seg in segments:
                        started = time.perf_counter()
                        peers.cli_push(tools.urls["jobmesh_file"], job, seg)
                        out[tool].append((time.perf_counter() - started) * 1e3)
                else:
                    async def go(tool: str = tool, job: str = job) -> None:
                        store = tools.store(tool)
                        try:
                            for seg in segments:
                                started = time.perf_counter()
                                if await push_segment(store, job, seg) != "uploaded":
                                    raise BenchError(f"{seg.name} was not uploaded")
                                out[tool].append((time.perf_counter() - started) * 1e3)
                        finally:
                            await store.close()

                    asyncio.run(go())
            except Exception as exc:
                errors.append(f"wal push {tool} round {r + 1}: {type(exc).__name__}: {exc}")
            done = out[tool][-len(segments):]
            say(f"round {r + 1}/{rounds} wal push {tool}: median "
                f"{statistics.median(done) if done else float('nan'):.1f} ms")
    return out



# --- report ----------------------------------------------------------------------------------


def median_of(runs: list[dict[str, float] | None], key: str) -> float | None:
    ok = [r[key] for r in runs if r is not None]
    return round(statistics.median(ok), 2) if ok else None


def percentile(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 1)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def summarize(results: dict[str, Any], wal: dict[str, list[float]]) -> dict[str, Any]:
    med = {op: {t: {"mb_per_s": median_of(runs, "mb_per_s"),
                    "seconds": median_of(runs, "seconds"), "cpu_s": median_of(runs, "cpu_s")}
                for t, runs in per.items()} for op, per in results.items()}
    ratios = {op: {f"{t}_vs_pgbackrest": ratio(med[op][t]["mb_per_s"],
                                               med[op]["pgbackrest"]["mb_per_s"])
                   for t in BACKUP_TOOLS if t != "pgbackrest"} for op in med}
    wal_stats = {t: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99),
                     "mean_ms": round(statistics.fmean(v), 1) if v else None, "samples": len(v)}
                 for t, v in wal.items()}
    return {"medians": med, "ratios_mb_per_s": ratios, "wal_push": wal_stats}


def markdown(report: dict[str, Any]) -> str:
    p, med, rounds = report["parameters"], report["medians"], report["rounds"]
    size = report["sizes"]
    lines = [
        f"pgbench scale {p['scale']}: PGDATA {size['pgdata_mb']:,.0f} MB "
        f"(pg_wal {size['pg_wal_mb']:,.0f} MB); {p['rounds']} interleaved rounds, "
        f"{report['machine']['nproc']} cores; MB/s of PGDATA, median (every round)",
        "",
        "| tool | backup MB/s | restore MB/s | backup s | restore s | read MB | stored MB "
        "| restore check |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def cell(op: str, tool: str) -> str:
        pts = ", ".join("err" if r is None else f"{r['mb_per_s']:.0f}" for r in rounds[op][tool])
        m = med[op][tool]["mb_per_s"]
        return f"{'n/a' if m is None else f'{m:,.0f}'} ({pts})"

    for t in BACKUP_TOOLS:
        mb = [median_of(rounds["backup"][t], k) for k in ("source_bytes", "stored_bytes")]
        read, stored = ("n/a" if v is None else f"{v / 1e6:,.0f}" for v in mb)
        lines.append(f"| {LABELS[t]} | {cell('backup', t)} | {cell('restore', t)} "
                     f"| {med['backup'][t]['seconds']} | {med['restore'][t]['seconds']} "
                     f"| {read} | {stored} | {report['restore_check'].get(t, '-')} |")
    for t in BACKUP_TOOLS[1:]:
        r = report["ratios_mb_per_s"]
        lines.append(f"| {LABELS[t]} / pgBackRest | {r['backup'][f'{t}_vs_pgbackrest']} "
                     f"| {r['restore'][f'{t}_vs_pgbackrest']} | | | | | |")
    lines += ["", f"WAL push, {p['wal_segments']} real 16 MiB segments x {p['rounds']} rounds, "
              "one at a time", "",
              "| tool | p50 ms | p99 ms | mean ms | samples |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for t in WAL_TOOLS:
        w = report["wal_push"][t]
        lines.append(f"| {LABELS[t]} | {w['p50_ms']} | {w['p99_ms']} | {w['mean_ms']} "
                     f"| {w['samples']} |")
    if report["errors"]:
        lines += ["", "Errors:", *(f"- {e}" for e in report["errors"])]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8),
                                   gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(BACKUP_TOOLS)
    for i, op in enumerate(("backup", "restore")):
        for k, tool in enumerate(BACKUP_TOOLS):
            x = i + (k - (len(BACKUP_TOOLS) - 1) / 2) * width
            m = report["medians"][op][tool]["mb_per_s"] or 0
            ax1.bar(x, m, width * 0.9, color=COLORS[tool], alpha=0.75,
                    label=LABELS[tool] if i == 0 else None)
            ax1.text(x, 5, f"{m:,.0f}", ha="center", va="bottom", fontsize=8)  # clear of dots
            pts = [r["mb_per_s"] for r in report["rounds"][op][tool] if r is not None]
            ax1.scatter([x] * len(pts), pts, color="black", s=10, zorder=3)
    ax1.set_xticks([0, 1], ["backup / snapshot", "restore"])
    ax1.set_ylabel("MB/s of PGDATA")
    top = max((r["mb_per_s"] for per in report["rounds"].values() for runs in per.values()
               for r in runs if r is not None), default=1)
    ax1.set_ylim(0, top * 1.3)  # room for the legend
    ax1.legend(fontsize=8, loc="upper right")
    size = report["sizes"]["pgdata_mb"]
    ax1.set_title(f"pgbench scale {report['parameters']['scale']} ({size:,.0f} MB), "
                  "median, dots = rounds", fontsize=10)
    for k, tool in enumerate(WAL_TOOLS):
        w = report["wal_push"][tool]
        for j, (q, alpha) in enumerate((("p50_ms", 0.85), ("p99_ms", 0.4))):
            v = w[q] or 0
            ax2.bar(k + (j - 0.5) * 0.38, v, 0.36, color=COLORS[tool], alpha=alpha)
            ax2.text(k + (j - 0.5) * 0.38, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(WAL_TOOLS)), [LABELS[t].replace(" (", "\n(").replace(" file", "\nfile")
                                            .replace(" s3", "\ns3") for t in WAL_TOOLS],
                   fontsize=8)
    ax2.set_yscale("log")
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.set_yticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
                    if t <= 2 * max((w["p99_ms"] or 0) for w in report["wal_push"].values())],
                   minor=False)
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax2.set_ylabel("ms per 16 MiB segment (log scale)")
    ax2.set_title("WAL push latency: p50 (solid), p99 (light)", fontsize=10)
    fig.suptitle(f"jobmesh vs pgBackRest ({report['machine']['nproc']} cores, "
                 f"{report['parameters']['rounds']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------


def versions(inst: Instance) -> dict[str, str]:
    import moto
    import zstandard

    return {"postgres": inst.psql("SHOW server_version"),
            "pgbackrest": peers.pgbackrest_version(), "python_zstandard": zstandard.__version__,
            "moto": moto.__version__}


def run(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    root = _peers.make_workdir(stack)
    walpool = root / "walpool"
    say(f"starting PostgreSQL and loading pgbench scale {args.scale} under {root}")
    inst = peers.start_postgres(stack, root, walpool)
    machine = {"nproc": CORES, "kernel": platform.release(), **versions(inst)}
    peers.load(inst, args.scale)
    expected = peers.content(inst)
    say(f"loaded: {expected.split(', md5')[0]}")
    pgbr = peers.setup_pgbackrest(root, inst, CORES)
    peers.archive_with_pgbackrest(inst, pgbr.config)  # the clean stop archives the load's WAL
    segments = pick_segments(walpool, args.wal_segments)
    for stanza in (peers.STANZA, peers.WAL_STANZA):
        pgbr.run(f"--stanza={stanza}", "stanza-create")
    pgbr.run(f"--stanza={peers.STANZA}", "check")
    endpoint = peers.start_moto(stack)
    tools = peers.Tools(root, inst, pgbr, endpoint)
    errors: list[str] = []
    results, restored = backup_rounds(tools, args.rounds, errors)
    restore_check = check_restores(inst, restored, expected)
    peers.ensure(inst, running=False)
    size, wal_size = peers.pgdata_bytes(inst.datadir)
    wal = wal_rounds(tools, segments, args.rounds, errors)
    return {
        "machine": machine,
        "parameters": {"rounds": args.rounds, "scale": args.scale,
                       "wal_segments": args.wal_segments, "pgbackrest_process_max": CORES,
                       "pgbackrest_compress": "zst (level 3)", "jobmesh_compress": "zstd level 3",
                       "order": "rotating per round", "postgres": "fsync=off, 256MB buffers"},
        "measures": MEASURES,
        "sizes": {"pgdata_mb": round(size / 1e6, 1), "pg_wal_mb": round(wal_size / 1e6, 1),
                  "wal_segment_mb": 16.8},
        "rounds": results,
        "wal_push_ms": wal,
        **summarize(results, wal),
        "restore_check": restore_check,
        "expected_content": expected,
        "errors": errors,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        peers.ensure_pgbackrest()
    except BenchError as exc:
        print(f"bench/backup.py: cannot install pgbackrest: {exc}", file=sys.stderr)
        return 2
    stack = contextlib.ExitStack()
    try:
        report = run(stack, args)
    except BenchError as exc:
        print(f"bench/backup.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/backup.py: interrupted, stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backup.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "backup.png")
    print(markdown(report))
    say(f"wrote {args.out / 'backup.json'} and {args.out / 'backup.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
