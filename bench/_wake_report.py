"""bench/wake.py's numbers: percentiles, targets, where a wake's time goes, table and chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

PEERS = ["wake", "wake_cold", "floor", "pgbackrest"]
LABELS = {"wake": "jobmesh wake, warm (router)",
          "wake_cold": "jobmesh wake, cold (router)", "floor": "floor: start on restored PGDATA",
          "pgbackrest": "pgBackRest restore + start"}
COLORS = {"wake": "#d62728", "wake_cold": "#ff9896", "floor": "#7f7f7f", "pgbackrest": "#1f77b4"}
# (p50 target in ms, for the job of this many MB of data)
WAKE_TARGETS = {10: 300.0, 1000: 2000.0}
CREATE_TARGET_MS = 300.0
WAKE_PHASES = [
    ("router", "router: login, wake request"),
    ("pickup", "controller: NOTIFY to resume start"),
    ("restore", "restore (download, unpack, sync)"),
    ("start", "PostgreSQL start"),
    ("personalise", "personalise"),
    ("agent", "agent spawn"),
    ("other", "controller: other"),
    ("to_row", "router: NOTIFY, backend login, first row"),
]
CREATE_PHASES = [
    ("insert", "create_job (catalog insert)"),
    ("pickup", "controller: NOTIFY to create start"),
    ("template", "template copy"),
    ("start", "PostgreSQL start"),
    ("personalise", "personalise"),
    ("agent", "agent spawn"),
    ("other", "controller: other"),
    ("to_row", "router: NOTIFY, backend login, first row"),
]


def percentile(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 1)


def stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "min": round(min(values), 1), "max": round(max(values), 1),
            "mean": round(statistics.fmean(values), 1)}


def _median(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return round(statistics.median(ok), 1) if ok else None


def wake_phases(s: dict[str, Any]) -> dict[str, float] | None:
    """One wake split by the controller's events (ms); None when an event is missing."""
    req, resuming, running = s["wake_requested_at_ms"], s["resuming_at_ms"], s["running_at_ms"]
    if None in (req, resuming, running):
        return None
    laps = s["laps_ms"]
    out = {"router": req, "pickup": resuming - req}
    for k in ("restore", "start", "personalise", "agent"):
        out[k] = laps.get(k, 0.0)
    out["other"] = (running - resuming) - sum(laps.get(k, 0.0) for k in laps)
    out["to_row"] = s["ms"] - running
    return {k: round(v, 1) for k, v in out.items()}


def create_phases(s: dict[str, Any]) -> dict[str, float] | None:
    created, running, ctl = s["created_at_ms"], s["running_at_ms"], s["controller_ms"]
    if None in (created, running, ctl):
        return None
    laps = s["laps_ms"]
    out = {"insert": s["create_job_ms"], "pickup": running - ctl - created}
    for k in ("template", "start", "personalise", "agent"):
        out[k] = laps.get(k, 0.0)
    out["other"] = ctl - sum(laps.get(k, 0.0) for k in laps)
    out["to_row"] = s["ms"] - running
    return {k: round(v, 1) for k, v in out.items()}


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    per_job: dict[str, Any] = {}
    for job_id, info in data["jobs"].items():
        wakes = data["wake"][job_id]
        cold = data["wake_cold"][job_id]
        phases = [p for p in map(wake_phases, cold) if p is not None]
        per_job[job_id] = {
            "mb": info["mb"],
            "wake_ms": stats([s["ms"] for s in wakes]),
            "wake_cold_ms": stats([s["ms"] for s in cold]),
            "warm_sources": sorted({str(s.get("source")) for s in wakes}),
            "cold_sources": sorted({str(s.get("source")) for s in cold}),
            "controller_resume_ms": stats([s["controller_ms"] for s in wakes
                                           if s["controller_ms"] is not None]),
            "floor_ms": stats([s["ms"] for s in data["floor"][job_id]]),
            "pgbackrest_ms": stats([s["ms"] for s in data["pgbackrest"][job_id]]),
            "pgbackrest_restore_ms": stats([s["restore_ms"] for s in
                                            data["pgbackrest"][job_id]]),
            "pause_ms": stats([p["ms"] for p in info.get("pauses", [])]),
            "restore_step_ms": stats([s["laps_ms"]["restore"] for s in cold
                                      if "restore" in s["laps_ms"]]),
            "start_step_ms": stats([s["laps_ms"]["start"] for s in cold
                                    if "start" in s["laps_ms"]]),
            "pgbackrest_start_to_row_ms": stats([s["start_to_row_ms"] for s in
                                                 data["pgbackrest"][job_id]]),
            "wake_breakdown_median_ms": {k: _median([p[k] for p in phases])
                                         for k, _ in WAKE_PHASES} if phases else None,
        }
    creates = data["create"]
    cphases = [p for p in map(create_phases, creates) if p is not None]
    create = {"first_row_ms": stats([s["ms"] for s in creates]),
              "controller_ms": stats([s["controller_ms"] for s in creates
                                      if s["controller_ms"] is not None]),
              "breakdown_median_ms": {k: _median([p[k] for p in cphases])
                                      for k, _ in CREATE_PHASES} if cphases else None,
              "unknown_job_retries": sum(s["unknown_job_retries"] for s in creates),
              "templates": sorted({str(s["template"]) for s in creates})}
    targets = []
    for mb, limit in WAKE_TARGETS.items():
        job = next((j for j, v in per_job.items() if v["mb"] == mb), None)
        for key, kind in (("wake_ms", "warm (local cache)"), ("wake_cold_ms",
                                                                 "cold (from the store)")):
            got = per_job[job][key]["p50"] if job and per_job[job][key] else None
            targets.append({"what": f"{kind} wake p50 at {mb:,} MB <= {limit:,.0f} ms",
                            "target_ms": limit, "p50_ms": got,
                            "met": None if got is None else got <= limit})
    for key, what in (("first_row_ms", "create to first row through the router"),
                      ("controller_ms", "controller create (creating -> running)")):
        got = create[key]["p50"] if create[key] else None
        targets.append({"what": f"{what} p50 <= {CREATE_TARGET_MS:.0f} ms",
                        "target_ms": CREATE_TARGET_MS, "p50_ms": got,
                        "met": None if got is None else got <= CREATE_TARGET_MS})
    return {"summary": {"jobs": per_job, "create": create}, "targets": targets}


# --- the markdown table ----------------------------------------------------------------------


def _cell(st: dict[str, Any] | None) -> str:
    if st is None:
        return "n/a"
    return f"**{st['p50']:,.0f}** / {st['p95']:,.0f} ({st['min']:,.0f}-{st['max']:,.0f})"


def _short(st: dict[str, Any] | None) -> str:
    return "n/a" if st is None else f"{st['p50']:,.0f} / {st['p95']:,.0f}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.0f}"


def markdown(data: dict[str, Any]) -> str:
    m, p = data["machine"], data["parameters"]
    summ = data["summary"]
    lines = [
        f"Connect to first row, ms: **p50** / p95 (min-max). {m['nproc']} cores, "
        f"{p['rounds']} rounds ({p['rounds_1gb']} at 1 GB), file:// store, warm page cache. "
        f"Shared machine: load {m['busy_before']['loadavg_1m']} before, "
        f"{m['busy_after']['loadavg_1m']} after; writing 1,300 8 KB files took "
        f"{m['file_create_1300_ms']['before']:,.0f} ms before, "
        f"{m['file_create_1300_ms']['after']:,.0f} ms after.",
        "",
        "| job | table MB | PGDATA MB | snapshot MB (stored) | jobmesh wake, warm (local "
        "cache) | jobmesh wake, cold (from the store) | floor: start "
        "restored PGDATA | pgBackRest restore + start | pgBackRest stored MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for job_id, info in data["jobs"].items():
        s = summ["jobs"][job_id]
        b = data["pgbackrest_backups"].get(job_id, {})
        lines.append(
            f"| {job_id} | {_mb(info['table_bytes'])} | {_mb(info.get('pgdata_bytes'))} "
            f"| {_mb(info.get('snapshot_bytes'))} ({_mb(info.get('stored_bytes'))}) "
            f"| {_cell(s['wake_ms'])} | {_cell(s['wake_cold_ms'])} | {_cell(s['floor_ms'])} "
            f"| {_cell(s['pgbackrest_ms'])} "
            f"| {_mb(b.get('stored_bytes'))} |")
    lines += ["", "Where a cold wake's time goes (median ms of each step, from the controller's "
              "events):", "",
              "| job | " + " | ".join(label for _, label in WAKE_PHASES) + " | total p50 |",
              "| --- |" + " ---: |" * (len(WAKE_PHASES) + 1)]
    for job_id in data["jobs"]:
        s = summ["jobs"][job_id]
        br = s["wake_breakdown_median_ms"] or {}
        lines.append(f"| {job_id} | " + " | ".join(
            "n/a" if br.get(k) is None else f"{br[k]:,.0f}" for k, _ in WAKE_PHASES)
            + f" | {_num(s['wake_cold_ms']['p50'] if s['wake_cold_ms'] else None)} |")
    lines += ["", "Restore and start alone, ms (p50 / p95):", "",
              "| job | jobmesh restore step (controller) | agent restore in the bench process "
              "(1 run) | pgBackRest restore | jobmesh start step (to ready) | floor (start to "
              "first row) | pgBackRest start to first row |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for job_id, info in data["jobs"].items():
        s = summ["jobs"][job_id]
        lines.append(
            f"| {job_id} | {_short(s['restore_step_ms'])} "
            f"| {_num(info.get('agent_restore_in_bench_ms'))} "
            f"| {_short(s['pgbackrest_restore_ms'])} | {_short(s['start_step_ms'])} "
            f"| {_short(s['floor_ms'])} | {_short(s['pgbackrest_start_to_row_ms'])} |")
    c = summ["create"]
    lines += ["", f"Create ({p['creates']} jobs, one at a time, template spares ready), ms:", "",
              "| create_job to first row (router) | controller create (event) | "
              + " | ".join(label for _, label in CREATE_PHASES) + " |",
              "| ---: | ---: |" + " ---: |" * len(CREATE_PHASES)]
    br = c["breakdown_median_ms"] or {}
    lines.append(f"| {_cell(c['first_row_ms'])} | {_cell(c['controller_ms'])} | " + " | ".join(
        "n/a" if br.get(k) is None else f"{br[k]:,.0f}" for k, _ in CREATE_PHASES) + " |")
    lines += ["", "| target | p50 ms | met |", "| --- | ---: | --- |"]
    for t in data["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} | {_num(t['p50_ms'])} | {met} |")
    if data["errors"]:
        lines += ["", "Errors:", *(f"- {e}" for e in data["errors"])]
    return "\n".join(lines)


# --- the chart --------------------------------------------------------------------------------


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    jobs = list(data["jobs"])
    summ = data["summary"]["jobs"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.6),
                                        gridspec_kw={"width_ratios": [3, 3, 1.3]})
    width = 0.8 / len(PEERS)
    samples = {"wake": data["wake"], "wake_cold": data["wake_cold"], "floor": data["floor"],
               "pgbackrest": data["pgbackrest"]}
    for i, job_id in enumerate(jobs):
        for k, peer in enumerate(PEERS):
            st = summ[job_id][f"{peer}_ms"]
            if st is None:
                continue
            x = i + (k - (len(PEERS) - 1) / 2) * width
            ax1.bar(x, st["p95"], width * 0.9, color=COLORS[peer], alpha=0.3)
            ax1.bar(x, st["p50"], width * 0.9, color=COLORS[peer], alpha=0.85,
                    label=LABELS[peer] if i == 0 else None)
            ax1.text(x, max(st["p95"], st["max"]) * 1.1, f"{st['p50']:,.0f}", ha="center",
                     va="bottom", fontsize=7)
            pts = [s["ms"] for s in samples[peer][job_id]]
            ax1.scatter([x] * len(pts), pts, color="black", s=6, zorder=3)
        limit = WAKE_TARGETS.get(data["jobs"][job_id]["mb"])
        if limit is not None:
            ax1.hlines(limit, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                       linewidth=1)
            ax1.text(i + 0.45, limit, f" target\n {limit:,.0f}", fontsize=7, va="center")
    ax1.set_xticks(range(len(jobs)), [_job_label(data, j) for j in jobs], fontsize=8)
    ax1.set_yscale("log")
    ax1.yaxis.set_minor_formatter(NullFormatter())
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    top = max((s["ms"] for peer in PEERS for runs in samples[peer].values() for s in runs),
              default=1000)
    ax1.set_ylim(top=top * 6)  # room for the legend above the bars
    ax1.set_ylabel("connect to first row, ms (log scale)")
    ax1.set_title("p50 (solid, labelled), p95 (light), dots = samples", fontsize=10)
    ax1.legend(fontsize=8, loc="upper left", ncol=2)

    # Each step of a wake, in ms on a log scale: the restore dwarfs the rest, which a
    # stacked bar would hide.
    cmap = plt.get_cmap("viridis")
    bw = 0.8 / max(len(jobs), 1)
    for i, job_id in enumerate(jobs):
        br = summ[job_id]["wake_breakdown_median_ms"] or {}
        xs = [n + (i - (len(jobs) - 1) / 2) * bw for n in range(len(WAKE_PHASES))]
        vals = [max(br.get(k) or 0, 0.5) for k, _ in WAKE_PHASES]
        ax2.bar(xs, vals, bw * 0.9, color=cmap(i / max(len(jobs) - 1, 1) * 0.85),
                label=_job_label(data, job_id).replace("\n", ", "))
        for x, v in zip(xs, vals, strict=True):
            ax2.text(x, v * 1.1, f"{v:,.0f}", ha="center", va="bottom", fontsize=5.5,
                     rotation=90)
    ax2.set_xticks(range(len(WAKE_PHASES)),
                   [label.replace(": ", ":\n").replace(", ", ",\n").replace(" (", "\n(")
                    for _, label in WAKE_PHASES], fontsize=6)
    ax2.set_yscale("log")
    ax2.set_ylim(top=max(ax2.get_ylim()[1], 10) * 8)
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax2.set_ylabel("median ms (log scale)")
    ax2.set_title("where a wake's time goes (controller events)", fontsize=10)
    ax2.legend(fontsize=7, loc="upper right")

    c = data["summary"]["create"]
    for k, key in enumerate(("first_row_ms", "controller_ms")):
        st = c[key]
        if st is None:
            continue
        ax3.bar(k, st["p95"], 0.6, color="#2ca02c", alpha=0.3)
        ax3.bar(k, st["p50"], 0.6, color="#2ca02c", alpha=0.85)
        ax3.text(k, max(st["p95"], st["max"]) + 4, f"{st['p50']:,.0f}", ha="center",
                 va="bottom", fontsize=8)
        field = "ms" if key == "first_row_ms" else "controller_ms"
        pts = [s[field] for s in data["create"] if s[field] is not None]
        ax3.scatter([k] * len(pts), pts, color="black", s=6, zorder=3)
        ax3.set_xticks([0, 1], ["create_job to\nfirst row", "controller\ncreate"], fontsize=8)
    ax3.axhline(CREATE_TARGET_MS, color="black", linestyle="dashed", linewidth=1)
    ax3.text(0.5, CREATE_TARGET_MS, "target", fontsize=7, va="bottom", ha="center")
    ax3.set_ylim(0, max([CREATE_TARGET_MS] + [s["ms"] for s in data["create"]]) * 1.15)
    ax3.set_ylabel("ms")
    ax3.set_title(f"job creation ({len(data['create'])} jobs)", fontsize=10)
    m = data["machine"]
    fig.suptitle(f"jobmesh wake and create latency ({m['nproc']} cores, file:// store, "
                 "real processes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _job_label(data: dict[str, Any], job_id: str) -> str:
    info = data["jobs"][job_id]
    pg = info.get("pgdata_bytes")
    return (f"{info['table_bytes'] / 1e6:,.0f} MB table\n"
            + (f"PGDATA {pg / 1e6:,.0f} MB" if pg else ""))
