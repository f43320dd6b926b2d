"""What a running job costs in the store with WAL streaming: bytes and requests per hour.

    .venv/bin/python bench/stream_cost.py [--duration 60] [--window 5] [--store file|s3]

For three loads, each on a fresh ``agent init`` cluster with ``agent serve``
beside it (streaming every ``--window`` seconds, the default archive_timeout):

- idle: nothing is written;
- a row every 2 s: one small INSERT (one commit) every two seconds;
- 1 MB/s: a 100 kB row of random hex text every 0.1 s (storage EXTERNAL, so
  PostgreSQL does not compress it and the WAL is about 1 MB/s).

It waits until the first base backup is stored and its WAL shipped, reads the
agent's ``/metrics`` (``jobmesh_agent_store_requests_total{op}``,
``jobmesh_agent_store_bytes_sent_total``, deltas and segments uploaded),
applies the load for ``--duration`` seconds, waits one more window so its WAL
is shipped, reads them again, and scales the difference to an hour. Writes
stream_cost.json to --out and prints a markdown table on stdout; progress goes
to stderr. Everything it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support: the benches reuse the suite's harness
from jobmesh import defaults  # noqa: E402
from jobmesh.agent.init import init_pgdata  # noqa: E402
from jobmesh.agent.postgres import Instance, free_port, give_to_postgres  # noqa: E402
from tests.support.process import LoggedProcess  # noqa: E402
from tests.support.waiting import until  # noqa: E402

LOADS = ["idle", "row_every_2s", "1MB_per_s"]
_METRIC = re.compile(r'^(jobmesh_agent_[a-z_]+)(?:\{op="(\w+)"\})? (\S+)$', re.M)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scrape(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return resp.read().decode()


def counters(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, op, value in _METRIC.findall(scrape(port, "/metrics")):
        out[f"{name}:{op}" if op else name] = float(value)
    return out


@contextlib.contextmanager
def job(root: Path, name: str, store_url: str, window: float,
        s3_endpoint: str | None) -> Iterator[tuple[Instance, LoggedProcess, int]]:
    base = root / name
    base.mkdir()
    give_to_postgres(base)
    init_pgdata(base / "pgdata", name, spool=base / "spool")  # the default archive_timeout
    inst = Instance(base / "pgdata", port=free_port())
    inst.start()
    cmd = [sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
           "--pgdata", str(base / "pgdata"),
           "--spool", str(base / "spool"), "--store", store_url, "--job", name,
           "--listen", "127.0.0.1:0", "--wal-window", f"{window:g}",
           "--base-backup-interval", "3600"]
    if s3_endpoint:
        cmd += ["--s3-endpoint", s3_endpoint]
    agent = LoggedProcess(f"agent {name}", cmd, failure=RuntimeError)
    try:
        port = int(agent.wait_for_log(r"agent listening on http://[\d.]+:(\d+)").group(1))
        yield inst, agent, port
    finally:
        agent.stop()
        inst.stop_quietly()


async def settle(port: int) -> None:
    """The first base backup is stored and its WAL shipped: no delta for 3 windows."""
    seen: dict[str, int] = {}

    def quiet() -> bool:
        s = json.loads(scrape(port, "/status"))
        stream = s["stream"]
        if not s["last_base_backup"] or seen.get("deltas") != stream["deltas_uploaded"]:
            seen.update(deltas=stream["deltas_uploaded"], rounds=stream["rounds"])
            return False
        return stream["rounds"] >= seen["rounds"] + 3

    await until(lambda: asyncio.to_thread(quiet), "the first base backup to settle", 300, 0.5)


async def apply(load: str, inst: Instance, db: str, duration: float) -> int:
    """Run the load for ``duration`` s; returns the WAL bytes it made."""
    conn = await asyncpg.connect(host=str(inst.socket_dir), port=inst.port, user="postgres",
                                 database=db)
    try:
        start = await conn.fetchval("select pg_current_wal_lsn() - '0/0'::pg_lsn")
        end_at = time.monotonic() + duration
        every = {"idle": duration, "row_every_2s": 2.0, "1MB_per_s": 0.1}[load]
        sql = {"row_every_2s": "insert into t (v) values (md5(random()::text))",
               "1MB_per_s": "insert into t (v) select string_agg(md5(random()::text), '')"
                            " from generate_series(1, 3125)"}.get(load)
        next_at = time.monotonic()
        while (now := time.monotonic()) < end_at:
            if sql is not None:
                await conn.execute(sql)
            next_at += every
            await asyncio.sleep(max(min(next_at, end_at) - now, 0))
        end = await conn.fetchval("select pg_current_wal_lsn() - '0/0'::pg_lsn")
        return int(end - start)
    finally:
        await conn.close()


async def measure(load: str, root: Path, store_url: str, window: float, duration: float,
                  s3_endpoint: str | None) -> dict[str, Any]:
    name = load.lower().replace("_", "-")
    with job(root, name, store_url, window, s3_endpoint) as (inst, _agent, port):
        # What autovacuum would do in a new cluster's first minutes (its catalogs were
        # just written), done now, so that the baseline is a job at rest.
        for db in ("template1", "postgres", f"job_{name}"):
            inst.psql("vacuum analyze", database=db)
        inst.psql("checkpoint")
        if load != "idle":  # before the baseline: an idle job writes nothing at all
            inst.psql("create table t (n serial, v text);"
                      " alter table t alter column v set storage external",
                      database=f"job_{name}")
        await settle(port)
        before = await asyncio.to_thread(counters, port)
        t0 = time.monotonic()
        wal = await apply(load, inst, f"job_{name}", duration)
        await asyncio.sleep(window + 1)  # the last window's WAL is shipped (part of the cost)
        elapsed = time.monotonic() - t0
        after = await asyncio.to_thread(counters, port)
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    per_hour = 3600 / elapsed
    requests = {k.split(":")[1]: v for k, v in diff.items()
                if k.startswith("jobmesh_agent_store_requests_total:") and v}
    sent = diff.get("jobmesh_agent_store_bytes_sent_total", 0.0)
    return {
        "load": load, "seconds": round(elapsed, 1), "wal_bytes": wal,
        "requests": requests, "bytes_sent": sent,
        "deltas": diff.get("jobmesh_agent_wal_deltas_uploaded_total", 0.0),
        "delta_bytes": diff.get("jobmesh_agent_wal_delta_bytes_uploaded_total", 0.0),
        "segments": diff.get("jobmesh_agent_wal_segments_uploaded_total", 0.0),
        "segment_bytes": diff.get("jobmesh_agent_wal_bytes_uploaded_total", 0.0),
        "requests_per_hour": round(sum(requests.values()) * per_hour),
        "bytes_per_hour": round(sent * per_hour),
        "wal_bytes_per_hour": round(wal * per_hour),
    }


def table(rows: list[dict[str, Any]], window: float, store: str) -> str:
    lines = [f"WAL window {window:g} s, archive_timeout {defaults.ARCHIVE_TIMEOUT} s, "
             f"{store} store", "",
             "| load | WAL/h | sent/h | requests/h | by kind (in the run) | deltas | segments |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v:g}" for k, v in sorted(r["requests"].items())) or "none"
        lines.append(f"| {r['load']} | {r['wal_bytes_per_hour'] / 1e6:,.1f} MB "
                     f"| {r['bytes_per_hour'] / 1e6:,.2f} MB | {r['requests_per_hour']:,} "
                     f"| {kinds} | {r['deltas']:g} | {r['segments']:g} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="jobmesh-stream-cost-"))
    os.chmod(root, 0o755)
    give_to_postgres(root)
    stack = contextlib.ExitStack()
    try:
        s3_endpoint = None
        if args.store == "s3":
            from tests.support.s3 import running_s3_server

            server = stack.enter_context(running_s3_server())
            for k, v in server.env.items():
                os.environ.setdefault(k, v)
            store_url = f"s3://{server.create_bucket('stream-cost')}/jobs"
            s3_endpoint = server.endpoint
        else:
            (root / "store").mkdir()
            store_url = f"file://{root / 'store'}"
        rows = []
        for load in LOADS:
            log(f"{load}: {args.duration:g} s")
            rows.append(await measure(load, root, store_url, args.window, args.duration,
                                      s3_endpoint))
            log(json.dumps(rows[-1]))
        report = {"machine": {"cores": os.cpu_count(), "platform": platform.platform()},
                  "window": args.window, "archive_timeout": defaults.ARCHIVE_TIMEOUT,
                  "store": args.store, "duration": args.duration, "loads": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stream_cost.json").write_text(json.dumps(report, indent=2) + "\n")
        print(table(rows, args.window, args.store))
        return 0
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60, help="seconds per load (default 60)")
    p.add_argument("--window", type=float, default=defaults.WAL_WINDOW,
                   help=f"the agent's --wal-window (default {defaults.WAL_WINDOW:g})")
    p.add_argument("--store", choices=["file", "s3"], default="file",
                   help="file:// or moto's S3 server (default file)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
