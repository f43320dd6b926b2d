"""Benchmark incremental pause snapshots and delta restores: jobmesh vs pgBackRest.

    .venv/bin/python bench/incremental.py [--size-mb 1000] [--rounds 3] [--quick]

One PostgreSQL 15 with a table t of --size-mb (bench/wake.py's fill), cleanly stopped,
snapshotted by jobmesh (``agent.snapshot.take_snapshot`` to a ``file://`` store) and
backed up by pgBackRest (offline full backup of the same stopped cluster). Then, peers
interleaved (the first one rotating each round):

- appends: R rounds of ~1% new rows + a contiguous 1% of rows updated, stop, then a
  jobmesh pause vs ``pgbackrest backup --type=incr``; and a delta restore of that state
  over a ``cp -a`` copy of the previous one (jobmesh ``restore(delta=True)`` vs
  ``pgbackrest restore --delta``, with and without ``--force``);
- random: R rounds of 1% of rows updated all over the table (``g % 100 = k``);
- cold restore of the latest state into an empty directory + start + first row, vs the
  machine's floor (dd of as many MiB with fdatasync + start of a present PGDATA);
- chunk sizes: the appends round again for each object chunk size.

Writes incremental.json and incremental.png to --out and prints markdown tables on
stdout; progress goes to stderr. Everything it starts is stopped, and its temp dir
removed, on exit, on error, on Ctrl-C and on SIGTERM.

Over ~400 lines on purpose: one benchmark run top to bottom (phases, report); the peers'
own code lives in bench/_incremental_peers.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _backup_peers
import _incremental_peers as ip
import _peers
from _peers import BenchError

from jobmesh.agent.postgres import give_to_postgres

CORES = os.cpu_count() or 1
SNAP = ["jobmesh", "pgbackrest"]
COLD = ["jobmesh", "pgbackrest", "floor"]
DELTA = ["jobmesh", "pgbackrest", "pgbackrest_force"]
LABELS = {"jobmesh": "jobmesh", "pgbackrest": "pgBackRest", "floor": "floor (dd + start)",
          "pgbackrest_force": "pgBackRest --delta --force"}
COLORS = {"jobmesh": "#d62728", "pgbackrest": "#1f77b4", "floor": "#7f7f7f",
          "pgbackrest_force": "#aec7e8"}
TARGETS = {"pause_upload_pct": 3.0, "pause_seconds": 1.0, "cold_vs_floor": 1.2,
           "delta_vs_pgbackrest": 0.4}
MEASURES = {
    "cluster": "both tools read the same cleanly stopped PGDATA: jobmesh takes a pause "
               "snapshot (its only mode); pgBackRest takes OFFLINE backups (--no-online) of "
               "it, like-for-like (an online backup of a running cluster would skip pg_wal "
               "but need the WAL archive and replay it at restore). The stop is not timed.",
    "pause jobmesh": "take_snapshot: pg_controldata check, scan, hash cache lookup, read + "
                     "HMAC-SHA256 of every chunk of a file whose size or mtime changed, store "
                     "lookup of new names, zstd-1 + write (fsync, rename) of missing objects, "
                     "manifest, hash cache; uploaded = manifest.extra new_bytes (compressed)",
    "backup pgbackrest": "backup --no-online --type=incr (full for the first): files whose "
                         "size or timestamp changed since the prior backup, copied whole, "
                         "zst-3, process-max = cores; offline, it includes pg_wal; stored = "
                         "info repository.delta (stored_wal_bytes: of that, in pg_wal)",
    "uploaded jobmesh": "bytes the pause added to the store, counted on disk: new objects + "
                        "its manifest (manifest.extra new_bytes is kept as new_bytes_reported: "
                        "it undercounts, see the report's errors)",
    "pct_of_pgdata": "uploaded bytes / bytes of the files the snapshot covers (PGDATA without "
                     "recycled WAL, manifest uncompressed_size)",
    "cold restore": "restore into an empty dir + pg_ctl start + connect (Unix socket, every "
                    "5 ms) + SELECT 1 FROM t LIMIT 1; jobmesh restore(delta=False), pgbackrest "
                    "restore --type=none (offline backup: no recovery); warm page cache",
    "floor": "dd if=/dev/zero bs=1M count=<MiB of the snapshot's files> conv=fdatasync, plus "
             "start + first row of a present, cleanly stopped copy of the same PGDATA",
    "delta restore": "over a cp -a copy of the previous state (hash cache included, mtimes "
                     "kept): jobmesh restore(delta=True); pgbackrest restore --delta (sha1 of "
                     "every local file) and --delta --force (size + timestamp); start untimed",
    "chunk sizes": "the appends change, then one pause per chunk size, each into its own store "
                   "with its own hash cache; the size is set by patching the module globals "
                   "CHUNK_SIZE (and MAX_OBJECT) of jobmesh.agent.cas.objects, .cas.upload, .cas "
                   "and jobmesh.agent.snapshot in the bench process (a measurement hack)",
    "where_time_goes": "cumulative seconds and calls of product functions, measured by "
                       "wrapping them in the bench process; summed over worker threads; the "
                       "async ones (store lookups, get objects) include waiting for a thread "
                       "of asyncio's default executor (min(32, cores + 4) threads)",
    "verification": "every restored cluster started and SELECT count(*), sum(g), "
                    "sum(hashtext(a||b||c)) FROM t compared with the source's at that state",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1000, help="table size in MB (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    p.add_argument("--append-mb", type=float, default=None,
                   help="MB of new rows per appends round (default 1%% of --size-mb)")
    p.add_argument("--chunk-sizes", default="256,1024,4096",
                   help="KiB sizes for the chunk-size rounds; 'none' to skip")
    p.add_argument("--quick", action="store_true", help="200 MB, 2 rounds")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    p.add_argument("--out", type=Path, default=_peers.REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.size_mb, args.rounds = 200, 2
    args.append_mb = args.append_mb or args.size_mb / 100
    args.chunk_kib = ([] if args.chunk_sizes in ("", "none")
                      else [int(x) for x in args.chunk_sizes.split(",")])
    return args


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotated(items: list[Any], r: int) -> list[Any]:
    return items[r % len(items):] + items[:r % len(items)]


class Bench:
    """The state one run carries from phase to phase."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.started = ip.Started()
        self.src = ip.Source(root, self.started)
        self.jm = ip.Jobmesh(root / "store")
        self.pgbr = ip.PgBackRest(root, self.src.pgdata, CORES)
        self.probe = ip.Probe()
        self.rng = random.Random(args.seed)
        self.errors: list[str] = []
        self.latest: dict[str, str] = {}  # jobmesh snapshot id, pgbackrest label, content
        self.snapshot_bytes = 0  # of the latest jobmesh snapshot (until one: all of PGDATA)

    def attempt(self, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """One measurement; a failure is recorded and does not hide the others."""
        load = round(os.getloadavg()[0], 2)
        try:
            res = fn()
        except Exception as exc:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            say(f"{what}: FAILED {exc}")
            return None
        res["loadavg_1m"] = load
        return res

    def pause_pair(self, r: int) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for peer in rotated(SNAP, r):
            ip.settle()
            if peer == "jobmesh":
                def jm() -> dict[str, Any]:
                    m, res = self.jm.snapshot(self.src.pgdata, self.probe)
                    self.latest["jobmesh"] = m.id
                    res["pct_of_pgdata"] = round(100 * res["uploaded_bytes"]
                                                 / res["snapshot_bytes"], 3)
                    return res
                out[peer] = self.attempt(f"round {r + 1} jobmesh pause", jm)
            else:
                def pb() -> dict[str, Any]:
                    res = self.pgbr.backup("incr" if self.latest.get("pgbackrest") else "full")
                    self.latest["pgbackrest"] = res["label"]
                    return res
                out[peer] = self.attempt(f"round {r + 1} pgbackrest backup", pb)
            res = out[peer]
            stored = (res.get("uploaded_bytes", res.get("stored_bytes", 0)) if res else 0) / 1e6
            say(f"  {peer}: " + (f"{res['seconds']:.2f} s, {stored:.1f} MB stored"
                                 if res else "failed"))
        jm, pb = out["jobmesh"], out["pgbackrest"]
        if jm:  # the same denominator for both: the files this state's snapshot covers
            self.snapshot_bytes = jm["snapshot_bytes"]
        if pb:
            pb["pct_of_pgdata"] = round(100 * pb["stored_bytes"] / self.snapshot_bytes, 3)
        return out

    def verify(self, pgdata: Path, expected: str, already: tuple[float, int] | None = None
               ) -> str:
        try:
            _s, port = already or ip.start_to_first_row(pgdata, self.started)
            return ip.check_restored(pgdata, port, expected)
        except Exception as exc:
            return f"check failed: {exc}"


def phase_first(b: Bench) -> dict[str, Any]:
    say("A: first jobmesh snapshot and pgBackRest full backup of the stopped cluster")
    b.pgbr.stanza_create()
    return {k: v for k, v in b.pause_pair(0).items()}


def phase_appends(b: Bench) -> dict[str, Any]:
    rows = round(b.args.append_mb * 1e6 / ip.ROW_BYTES)
    pauses: dict[str, list] = {p: [] for p in SNAP}
    deltas: dict[str, list] = {p: [] for p in DELTA}
    changes, checks = [], []
    for r in range(b.args.rounds):
        say(f"B: appends round {r + 1}/{b.args.rounds}: copies of the current state, change")
        stale = {p: b.root / f"stale-{p}" for p in DELTA}
        for d in stale.values():
            ip.copy_tree(b.src.pgdata, d)
        change = b.src.appends(rows, b.rng.randrange(1 << 30))
        changes.append(change)
        for p, res in b.pause_pair(r).items():
            pauses[p].append(res)
        say(f"D2: delta restores over the copies, round {r + 1}")
        for peer in rotated(DELTA, r):
            ip.settle()
            res = b.attempt(f"round {r + 1} {peer} delta restore",
                            functools.partial(delta_restore, b, peer, stale[peer]))
            deltas[peer].append(res)
            check = b.verify(stale[peer], change["content"]) if res else "not restored"
            checks.append(f"delta {peer} round {r + 1}: {check}")
            say(f"  {peer}: " + (f"{res['seconds']:.2f} s, {check}" if res else "failed"))
            ip.rmtree(stale[peer])
    b.latest["content"] = changes[-1]["content"]
    return {"changes": changes, "pause": pauses, "delta_restore": deltas, "checks": checks}


def delta_restore(b: Bench, peer: str, target: Path) -> dict[str, Any]:
    if peer == "jobmesh":
        return b.jm.restore(target, b.latest["jobmesh"], delta=True, probe=b.probe)
    return b.pgbr.restore(target, b.latest["pgbackrest"], delta=True,
                          force=peer == "pgbackrest_force")


def phase_random(b: Bench) -> dict[str, Any]:
    pauses: dict[str, list] = {p: [] for p in SNAP}
    changes = []
    for r, k in enumerate(b.rng.sample(range(100), b.args.rounds)):
        say(f"C: random round {r + 1}/{b.args.rounds} (g % 100 = {k})")
        changes.append(b.src.random(k))
        for p, res in b.pause_pair(r).items():
            pauses[p].append(res)
    b.latest["content"] = changes[-1]["content"]
    return {"changes": changes, "pause": pauses}


def phase_cold(b: Bench) -> dict[str, Any]:
    floor_dir = b.root / "floor-pgdata"
    ip.copy_tree(b.src.pgdata, floor_dir)
    mib = -(-b.snapshot_bytes // (1 << 20))  # what the restore writes: the latest snapshot
    out: dict[str, list] = {p: [] for p in COLD}
    checks = []
    for r in range(b.args.rounds):
        say(f"D1: cold restores, round {r + 1}/{b.args.rounds}")
        for peer in rotated(COLD, r):
            target = b.root / f"cold-{peer}"
            ip.settle()
            started: list[tuple[float, int]] = []

            def one(peer: str = peer, target: Path = target,
                    started: list[tuple[float, int]] = started) -> dict[str, Any]:
                t0 = time.perf_counter()
                if peer == "jobmesh":
                    res = b.jm.restore(target, b.latest["jobmesh"], delta=False, probe=b.probe)
                elif peer == "pgbackrest":
                    res = b.pgbr.restore(target, b.latest["pgbackrest"])
                else:
                    res = {"dd_seconds": round(ip.dd_seconds(b.root / "dd.bin", mib), 3),
                           "dd_mib": mib}
                restore_s = time.perf_counter() - t0
                start = ip.start_to_first_row(floor_dir if peer == "floor" else target,
                                              b.started)
                started.append(start)
                res.update(restore_seconds=round(restore_s, 3),
                           start_to_row_seconds=round(start[0], 3),
                           seconds=round(restore_s + start[0], 3))
                return res

            res = b.attempt(f"round {r + 1} cold {peer}", one)
            out[peer].append(res)
            check = (b.verify(floor_dir if peer == "floor" else target, b.latest["content"],
                              started[0]) if started else "not restored")
            checks.append(f"cold {peer} round {r + 1}: {check}")
            say(f"  {peer}: " + (f"{res['seconds']:.2f} s, {check}" if res else "failed"))
            if peer != "floor":
                ip.rmtree(target)
    ip.rmtree(floor_dir)
    return {"restore": out, "checks": checks, "floor_mib": mib}


def phase_chunks(b: Bench) -> dict[str, Any]:
    kibs = b.args.chunk_kib
    caches = b.root / "caches"
    caches.mkdir()
    stores = {k: ip.Jobmesh(b.root / f"store-{k}k") for k in kibs}

    def pause(k: int, what: str) -> dict[str, Any] | None:
        park, mine = caches / "main", caches / f"{k}k"
        ip.swap_cache(b.src.pgdata, park, mine)
        try:
            with ip.chunk_size(k << 10):
                res = b.attempt(what, lambda: stores[k].snapshot(b.src.pgdata, b.probe)[1])
        finally:
            ip.swap_cache(b.src.pgdata, mine, park)
        if res:
            res["pct_of_pgdata"] = round(100 * res["uploaded_bytes"] / res["snapshot_bytes"], 3)
            res.pop("where_time_goes", None)
        return res

    first, rounds = {}, {k: [] for k in kibs}
    say("E: first snapshot at each chunk size")
    for k in kibs:
        ip.settle()
        first[k] = pause(k, f"chunk {k} KiB first snapshot")
    rows = round(b.args.append_mb * 1e6 / ip.ROW_BYTES)
    for r in range(b.args.rounds):
        say(f"E: appends round {r + 1}/{b.args.rounds}, a pause per chunk size")
        b.src.appends(rows, b.rng.randrange(1 << 30))
        for k in rotated(kibs, r):
            ip.settle()
            rounds[k].append(pause(k, f"chunk {k} KiB round {r + 1}"))
            res = rounds[k][-1]
            say(f"  {k} KiB: " + (f"{res['seconds']:.2f} s, {res['uploaded_bytes'] / 1e6:.1f} MB"
                                  if res else "failed"))
    return {"first": first, "pause": rounds,
            "stores_bytes": {k: s.store_bytes() for k, s in stores.items()}}


# --- report -----------------------------------------------------------------------------


def p50(runs: list[dict[str, Any] | None], key: str) -> float | None:
    ok = [r[key] for r in runs if r is not None and r.get(key) is not None]
    return round(statistics.median(ok), 3) if ok else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def time_split(runs: list[dict[str, Any] | None]) -> dict[str, float]:
    """Median cumulative seconds per probed function over the samples."""
    keys = {k for r in runs if r for k in r.get("where_time_goes", {})}
    out = {k: statistics.median([r["where_time_goes"].get(k, {}).get("cum_s", 0.0)
                                 for r in runs if r]) for k in keys}
    return dict(sorted(((k, round(v, 3)) for k, v in out.items()), key=lambda kv: -kv[1]))


def summarize(rep: dict[str, Any]) -> None:
    keys = ["seconds", "uploaded_bytes", "stored_bytes", "read_bytes", "new_objects",
            "pct_of_pgdata", "cpu_s", "stored_wal_bytes"]
    p = rep["p50"] = {}
    for sc in ("appends", "random"):
        pause = rep[sc]["pause"]
        p[sc] = {t: {k: p50(pause[t], k) for k in keys} for t in SNAP}
        p[sc]["jobmesh_vs_pgbackrest_seconds"] = ratio(p[sc]["jobmesh"]["seconds"],
                                                       p[sc]["pgbackrest"]["seconds"])
        p[sc]["jobmesh_vs_pgbackrest_bytes"] = ratio(p[sc]["jobmesh"]["uploaded_bytes"],
                                                     p[sc]["pgbackrest"]["stored_bytes"])
        rep[sc]["where_time_goes_p50"] = time_split(pause["jobmesh"])
    cold = rep["cold"]["restore"]
    p["cold"] = {t: {k: p50(cold[t], k) for k in ("seconds", "restore_seconds",
                                                   "start_to_row_seconds", "dd_seconds")}
                 for t in COLD}
    p["cold"]["jobmesh_vs_floor"] = ratio(p["cold"]["jobmesh"]["seconds"],
                                          p["cold"]["floor"]["seconds"])
    p["cold"]["jobmesh_vs_pgbackrest"] = ratio(p["cold"]["jobmesh"]["seconds"],
                                               p["cold"]["pgbackrest"]["seconds"])
    rep["cold"]["where_time_goes_p50"] = time_split(cold["jobmesh"])
    delta = rep["appends"]["delta_restore"]
    p["delta"] = {t: {"seconds": p50(delta[t], "seconds")} for t in DELTA}
    p["delta"]["jobmesh"].update({k: p50(delta["jobmesh"], k) for k in (
        "written_bytes", "fetched_objects", "hashed_mb", "reused_files")})
    p["delta"]["jobmesh_vs_pgbackrest"] = ratio(p["delta"]["jobmesh"]["seconds"],
                                                p["delta"]["pgbackrest"]["seconds"])
    p["delta"]["jobmesh_vs_pgbackrest_force"] = ratio(p["delta"]["jobmesh"]["seconds"],
                                                      p["delta"]["pgbackrest_force"]["seconds"])
    rep["appends"]["delta_where_time_goes_p50"] = time_split(delta["jobmesh"])
    if rep.get("chunk_sizes"):
        cs = rep["chunk_sizes"]
        p["chunk_sizes"] = {k: {m: p50(runs, m) for m in ("seconds", "uploaded_bytes",
                                                          "new_objects", "read_bytes",
                                                          "pct_of_pgdata")}
                            for k, runs in cs["pause"].items()}
    t = TARGETS
    checks = []

    def target(name: str, value: float | None, limit: float, unit: str) -> None:
        checks.append({"target": name, "value": value, "limit": limit, "unit": unit,
                       "pass": value is not None and value <= limit})

    for sc in ("appends", "random"):
        target(f"{sc}: jobmesh pause uploads <= {t['pause_upload_pct']}% of PGDATA (p50)",
               p[sc]["jobmesh"]["pct_of_pgdata"], t["pause_upload_pct"], "%")
        target(f"{sc}: jobmesh pause <= {t['pause_seconds']} s (p50)",
               p[sc]["jobmesh"]["seconds"], t["pause_seconds"], "s")
    target(f"cold restore + start: jobmesh / floor <= {t['cold_vs_floor']} (p50)",
           p["cold"]["jobmesh_vs_floor"], t["cold_vs_floor"], "x")
    target(f"delta restore: jobmesh / pgbackrest --delta <= {t['delta_vs_pgbackrest']} (p50)",
           p["delta"]["jobmesh_vs_pgbackrest"], t["delta_vs_pgbackrest"], "x")
    all_checks = rep["appends"]["checks"] + rep["cold"]["checks"]
    checks.append({"target": "every restore identical to the source",
                   "value": sum(": identical" in c for c in all_checks),
                   "limit": len(all_checks), "unit": "restores",
                   "pass": all(c.endswith(": identical") for c in all_checks)})
    rep["targets"] = checks


def fmt(runs: list[dict[str, Any] | None], key: str, scale: float = 1.0, nd: int = 2) -> str:
    pts = ["err" if r is None or r.get(key) is None else f"{r[key] / scale:.{nd}f}"
           for r in runs]
    m = p50(runs, key)
    return f"{'n/a' if m is None else f'{m / scale:.{nd}f}'} ({', '.join(pts)})"


def markdown(rep: dict[str, Any]) -> str:
    s, par = rep["sizes"], rep["parameters"]
    lines = [f"t {par['size_mb']} MB ({s['rows']:,} rows), PGDATA {s['pgdata_bytes'] / 1e6:,.0f}"
             f" MB on disk, {s['snapshot_bytes'] / 1e6:,.0f} MB in a snapshot; {par['rounds']} "
             f"rounds, {rep['machine']['nproc']} cores; p50 (every round)", "",
             "| change | tool | seconds | stored MB | % of PGDATA | read MB | new objects "
             "| of which pg_wal MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    first = rep["first"]
    for t in SNAP:
        key = "uploaded_bytes" if t == "jobmesh" else "stored_bytes"
        lines.append(f"| first (full) | {LABELS[t]} | {fmt([first[t]], 'seconds')} "
                     f"| {fmt([first[t]], key, 1e6, 1)} | {fmt([first[t]], 'pct_of_pgdata')} "
                     f"| {fmt([first[t]], 'read_bytes', 1e6, 0) if t == 'jobmesh' else ''} "
                     f"| {fmt([first[t]], 'new_objects', 1, 0) if t == 'jobmesh' else ''} "
                     f"| {'' if t == 'jobmesh' else fmt([first[t]], 'stored_wal_bytes', 1e6, 1)} |")
    for sc in ("appends", "random"):
        pause = rep[sc]["pause"]
        for t in SNAP:
            key = "uploaded_bytes" if t == "jobmesh" else "stored_bytes"
            jm = t == "jobmesh"
            lines.append(f"| {sc} | {LABELS[t]} | {fmt(pause[t], 'seconds')} "
                         f"| {fmt(pause[t], key, 1e6, 1)} | {fmt(pause[t], 'pct_of_pgdata')} "
                         f"| {fmt(pause[t], 'read_bytes', 1e6, 0) if jm else ''} "
                         f"| {fmt(pause[t], 'new_objects', 1, 0) if jm else ''} "
                         f"| {'' if jm else fmt(pause[t], 'stored_wal_bytes', 1e6, 1)} |")
        p = rep["p50"][sc]
        lines.append(f"| {sc} | jobmesh / pgBackRest | {p['jobmesh_vs_pgbackrest_seconds']} "
                     f"| {p['jobmesh_vs_pgbackrest_bytes']} | | | | |")
    lines += ["", "| restore | tool | total s | restore s | start + first row s | check |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    cold = rep["cold"]["restore"]
    for t in COLD:
        ok = all(c.endswith("identical") for c in rep["cold"]["checks"] if f"cold {t} " in c)
        lines.append(f"| cold, empty dir | {LABELS[t]} | {fmt(cold[t], 'seconds')} "
                     f"| {fmt(cold[t], 'restore_seconds')} | {fmt(cold[t], 'start_to_row_seconds')}"
                     f" | {'identical' if ok else 'SEE JSON'} |")
    pc = rep["p50"]["cold"]
    lines.append(f"| cold | jobmesh / floor = {pc['jobmesh_vs_floor']}, jobmesh / pgBackRest = "
                 f"{pc['jobmesh_vs_pgbackrest']} | | | | |")
    delta = rep["appends"]["delta_restore"]
    for t in DELTA:
        ok = all(c.endswith("identical") for c in rep["appends"]["checks"] if f"delta {t} " in c)
        name = "pgBackRest --delta" if t == "pgbackrest" else LABELS[t]
        lines.append(f"| delta over stale copy | {name} | {fmt(delta[t], 'seconds')} | | "
                     f"| {'identical' if ok else 'SEE JSON'} |")
    pd = rep["p50"]["delta"]
    lines.append(f"| delta | jobmesh / pgBackRest --delta = {pd['jobmesh_vs_pgbackrest']}, "
                 f"/ --force = {pd['jobmesh_vs_pgbackrest_force']} | | | | |")
    if rep.get("chunk_sizes"):
        cs = rep["chunk_sizes"]
        lines += ["", "| chunk KiB | first snapshot s | first MB | appends pause s | uploaded MB "
                  "| new objects | read MB | store MB |", "| ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: | ---: |"]
        for k, runs in cs["pause"].items():
            f = [cs["first"][k]]
            lines.append(f"| {k} | {fmt(f, 'seconds')} | {fmt(f, 'uploaded_bytes', 1e6, 1)} "
                         f"| {fmt(runs, 'seconds')} | {fmt(runs, 'uploaded_bytes', 1e6, 2)} "
                         f"| {fmt(runs, 'new_objects', 1, 0)} | {fmt(runs, 'read_bytes', 1e6, 0)} "
                         f"| {cs['stores_bytes'][k] / 1e6:,.0f} |")
    lines += ["", "Targets:"]
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'}: {c['target']}: {c['value']} {c['unit']}"
              for c in rep["targets"]]
    for what, key in (("appends pause", ("appends", "where_time_goes_p50")),
                      ("delta restore", ("appends", "delta_where_time_goes_p50")),
                      ("cold restore", ("cold", "where_time_goes_p50"))):
        top = list(rep[key[0]][key[1]].items())[:5]
        lines.append(f"- where a jobmesh {what}'s time goes (cumulative s, p50): "
                     + ", ".join(f"{k} {v}" for k, v in top))
    if rep["errors"]:
        lines += ["", "Errors:", *(f"- {e}" for e in rep["errors"])]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def bars(ax: Any, groups: list[tuple[str, dict[str, list]]], key: str | dict[str, str],
             scale: float = 1.0) -> None:
        for i, (_name, per) in enumerate(groups):
            tools = list(per)
            width = 0.8 / len(tools)
            for j, t in enumerate(tools):
                k = key if isinstance(key, str) else key[t]
                x = i + (j - (len(tools) - 1) / 2) * width
                m = p50(per[t], k) or 0
                ax.bar(x, m / scale, width * 0.9, color=COLORS[t], alpha=0.75,
                       label=LABELS[t] if i == 0 or t not in [tt for _, p in groups[:i]
                                                             for tt in p] else None)
                ax.text(x, m / scale, f"{m / scale:.3g}", ha="center", va="bottom", fontsize=7)
                pts = [r[k] / scale for r in per[t] if r and r.get(k) is not None]
                ax.scatter([x] * len(pts), pts, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(groups)), [g for g, _ in groups])
        ax.legend(fontsize=8)

    pause_groups = [("first (full)", {t: [rep["first"][t]] for t in SNAP}),
                    ("appends", rep["appends"]["pause"]), ("random", rep["random"]["pause"])]
    bars(axes[0][0], pause_groups, "seconds")
    axes[0][0].axhline(TARGETS["pause_seconds"], color="red", ls=":", lw=1)
    axes[0][0].set_ylabel("seconds")
    axes[0][0].set_yscale("log")
    axes[0][0].set_title("pause snapshot / backup time (log; dotted: 1 s target)", fontsize=10)
    bars(axes[0][1], pause_groups, {"jobmesh": "uploaded_bytes", "pgbackrest": "stored_bytes"},
         1e6)
    axes[0][1].set_yscale("log")
    axes[0][1].set_ylabel("MB stored (log)")
    axes[0][1].axhline(rep["sizes"]["snapshot_bytes"] * TARGETS["pause_upload_pct"] / 100 / 1e6,
                       color="red", ls=":", lw=1)
    axes[0][1].set_title("bytes each pause / backup stored (dotted: 3% of PGDATA)", fontsize=10)
    bars(axes[1][0], [("cold, empty dir", rep["cold"]["restore"]),
                      ("delta, stale copy", rep["appends"]["delta_restore"])], "seconds")
    axes[1][0].set_ylabel("seconds")
    axes[1][0].set_title("restore (cold: + start + first row)", fontsize=10)
    ax = axes[1][1]
    if rep.get("chunk_sizes"):
        pc = rep["p50"]["chunk_sizes"]
        ks = list(pc)
        ax.bar([i - 0.2 for i in range(len(ks))], [pc[k]["uploaded_bytes"] / 1e6 for k in ks],
               0.38, color="#d62728", alpha=0.75, label="uploaded MB")
        ax2 = ax.twinx()
        ax2.bar([i + 0.2 for i in range(len(ks))], [pc[k]["seconds"] for k in ks], 0.38,
                color="#ff9896", alpha=0.75, label="seconds")
        ax.set_xticks(range(len(ks)), [f"{k} KiB" for k in ks])
        ax.set_ylabel("uploaded MB (p50)")
        ax2.set_ylabel("pause seconds (p50)")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        ax.set_title("appends pause by object chunk size", fontsize=10)
    else:
        ax.axis("off")
    fig.suptitle(f"incremental pauses and delta restores, jobmesh vs pgBackRest: t "
                 f"{rep['parameters']['size_mb']} MB, {rep['machine']['nproc']} cores, "
                 "p50 bars, dots = rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------


def run(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="jobmesh-bench-incr-", dir=args.workdir))
    stack.callback(ip.rmtree, root)
    root.chmod(0o755)
    give_to_postgres(root)
    b = Bench(root, args)
    stack.callback(b.started.stop_all)
    b.probe.install()
    stack.callback(b.probe.uninstall)
    load_before = os.getloadavg()
    rows = round(args.size_mb * 1e6 / ip.ROW_BYTES)
    say(f"loading t with {rows:,} rows ({args.size_mb} MB) under {root}")
    loaded = b.src.load(rows)
    b.latest["content"] = loaded["content"]
    pgdata_total, pgdata_wal = _backup_peers.pgdata_bytes(b.src.pgdata)
    b.snapshot_bytes = pgdata_total
    first = phase_first(b)
    snap_bytes = b.snapshot_bytes
    if first["jobmesh"]:
        first["jobmesh"]["pct_of_pgdata"] = round(
            100 * first["jobmesh"]["uploaded_bytes"] / snap_bytes, 3)
    rep: dict[str, Any] = {
        "machine": {"nproc": CORES, "kernel": platform.release(),
                    "postgres": "15", "pgbackrest": _backup_peers.pgbackrest_version(),
                    "loadavg_before": load_before},
        "parameters": {"size_mb": args.size_mb, "rounds": args.rounds,
                       "append_mb": args.append_mb, "seed": args.seed,
                       "chunk_kib": args.chunk_kib, "order": "rotating per round",
                       "postgres_settings": ip.SETTINGS, "pgbackrest_process_max": CORES,
                       "pgbackrest_compress": "zst level 3", "jobmesh_compress": "zstd level 1",
                       "store": "file:// on the same disk", "workdir": str(root)},
        "measures": MEASURES, "targets_limits": TARGETS,
        "sizes": {"rows": rows, "table_bytes": loaded["table_bytes"],
                  "pgdata_bytes": pgdata_total, "pgdata_wal_bytes": pgdata_wal,
                  "snapshot_bytes": snap_bytes, "load_seconds": loaded["load_seconds"]},
        "first": first,
    }
    rep["appends"] = phase_appends(b)
    rep["random"] = phase_random(b)
    rep["cold"] = phase_cold(b)
    if args.chunk_kib:
        rep["chunk_sizes"] = phase_chunks(b)
    rep["sizes"]["pgdata_bytes_at_end"] = _backup_peers.pgdata_bytes(b.src.pgdata)[0]
    rep["machine"]["loadavg_after"] = os.getloadavg()
    rep["errors"] = b.errors
    summarize(rep)
    samples = [r for sc in ("appends", "random") for r in rep[sc]["pause"]["jobmesh"] if r]
    # The manifest's new_bytes (what the pause says it uploaded) against the objects that
    # appeared on disk: the uploaded bytes this bench reports are the latter.
    pairs = [[r["new_bytes_reported"], r["object_bytes"]] for r in samples]
    rep["new_bytes_reported_vs_on_disk"] = {
        "pairs": pairs, "all_equal": all(a == b for a, b in pairs)}
    return rep


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _backup_peers.ensure_pgbackrest()
    except BenchError as exc:
        print(f"bench/incremental.py: cannot install pgbackrest: {exc}", file=sys.stderr)
        return 2
    stack = contextlib.ExitStack()
    try:
        report = run(stack, args)
    except BenchError as exc:
        print(f"bench/incremental.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/incremental.py: interrupted, stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "incremental.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(report, args.out / "incremental.png")
    print(markdown(report))
    say(f"wrote {args.out / 'incremental.json'} and {args.out / 'incremental.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
