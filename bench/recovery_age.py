"""How long a job that has written for an hour takes to recover from the store.

    .venv/bin/python bench/recovery_age.py [--duration 3600] [--size-mb 100] [--store file|s3]

One job on a fresh ``agent init`` cluster, ``agent serve`` beside it on the
deployed defaults (WAL window, archive_timeout, base backups every
``BASE_BACKUP_INTERVAL`` s or ``BASE_BACKUP_WAL_BYTES`` of WAL). A writer
inserts 500-byte rows at a steady rate for ``--duration`` seconds so the
table reaches ``--size-mb``, keeping a ledger of every acknowledged row.
Then the machine is lost: ``kill -9`` of PostgreSQL and the agent, and
PGDATA and the spool removed. The job recovers the way the controller
recovers it (``agent.restore.restore`` of the newest snapshot, then
PostgreSQL starts and replays the archived WAL), timed from the start of the
restore to the end of recovery (the job takes writes again), with the WAL replayed (the restored
position minus the base backup's start) and the acknowledged rows lost.

A second recovery follows as the floor: the recovered job is served again,
its policy base backup (taken on the new timeline) is awaited, and the same
loss and recovery are repeated, so the table shows what the hour of age
costs over a job that was just backed up. Writes recovery_age.json to --out
and prints a markdown table on stdout; progress goes to stderr.
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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.support: the benches reuse the suite's harness
from jobmesh import defaults  # noqa: E402
from jobmesh.agent.init import init_pgdata  # noqa: E402
from jobmesh.agent.postgres import Instance, free_port, give_to_postgres  # noqa: E402
from jobmesh.agent.restore import restore  # noqa: E402
from jobmesh.agent.store import open_store  # noqa: E402
from jobmesh.agent.walnames import parse_lsn  # noqa: E402
from tests.support.process import LoggedProcess  # noqa: E402
from tests.support.waiting import until  # noqa: E402

ROW = 500  # bytes of text per row


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Job:
    def __init__(self, root: Path, name: str, store_url: str, s3_endpoint: str | None):
        self.base, self.name, self.store_url, self.s3_endpoint = root / name, name, store_url, \
            s3_endpoint
        self.pgdata, self.spool = self.base / "pgdata", self.base / "spool"
        self.inst = Instance(self.pgdata, port=free_port())
        self.agent: LoggedProcess | None = None
        self.agent_port = 0

    def serve(self) -> None:
        cmd = [sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
               "--pgdata", str(self.pgdata),
               "--spool", str(self.spool), "--store", self.store_url, "--job", self.name,
               "--listen", "127.0.0.1:0"]
        if self.s3_endpoint:
            cmd += ["--s3-endpoint", self.s3_endpoint]
        self.agent = LoggedProcess(f"agent {self.name}", cmd, failure=RuntimeError)
        self.agent_port = int(self.agent.wait_for_log(
            r"agent listening on http://[\d.]+:(\d+)").group(1))

    def status(self) -> dict[str, Any]:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}/status",
                                    timeout=30) as resp:
            return json.loads(resp.read())

    def lose_machine(self) -> None:
        """kill -9 of PostgreSQL (every process of it) and the agent; PGDATA and spool gone."""
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.agent is not None:
            self.agent.kill()
            self.agent = None
        shutil.rmtree(self.pgdata)
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir()
        give_to_postgres(self.spool)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.inst.stop_quietly()

    def dsn(self) -> dict[str, Any]:
        return {"host": str(self.inst.socket_dir), "port": self.inst.port, "user": "postgres",
                "database": f"job_{self.name}"}


async def write(job: Job, duration: float, size: int, acked: list[int]) -> None:
    """Insert ROW-byte rows for ``duration`` s at the rate that makes ``size`` bytes."""
    rows_per_s = size / ROW / duration
    batch = max(1, round(rows_per_s / 4))  # four commits a second
    every = batch / rows_per_s
    conn = await asyncpg.connect(**job.dsn())
    try:
        n = 0
        next_at = time.monotonic()
        end_at = next_at + duration
        while time.monotonic() < end_at:
            ids = list(range(n + 1, n + batch + 1))
            await conn.execute("insert into ledger (id, v) select i, repeat(md5(i::text), $2)"
                               " from unnest($1::int[]) i", ids, ROW // 32)
            acked.extend(ids)
            n += batch
            next_at += every
            await asyncio.sleep(max(next_at - time.monotonic(), 0))
    finally:
        await conn.close()


async def recover(job: Job) -> dict[str, Any]:
    """Restore the newest snapshot, start PostgreSQL, until it takes writes: timed."""
    store = open_store(job.store_url, s3_endpoint=job.s3_endpoint)
    t0 = time.monotonic()
    try:
        result = await restore(job.pgdata, store, job.name, s3_endpoint=job.s3_endpoint)
    finally:
        await store.close()
    t_restored = time.monotonic()
    await asyncio.to_thread(job.inst.start, 600)

    async def writable() -> bool:
        try:
            conn = await asyncpg.connect(**job.dsn(), timeout=5)
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            return not await conn.fetchval("select pg_is_in_recovery()")
        finally:
            await conn.close()

    await until(writable, "the recovered job to take writes", 600, 0.02)
    t_ready = time.monotonic()
    conn = await asyncpg.connect(**job.dsn())
    try:
        position = await conn.fetchval("select pg_current_wal_lsn()::text")
        ids = {r["id"] for r in await conn.fetch("select id from ledger")}
    finally:
        await conn.close()
    m = result.manifest
    return {"snapshot": m.id, "kind": m.kind, "snapshot_timeline": m.timeline,
            "restore_s": round(t_restored - t0, 2), "start_and_replay_s":
                round(t_ready - t_restored, 2), "total_s": round(t_ready - t0, 2),
            "bytes_restored": result.bytes_restored,
            "wal_replayed_bytes": parse_lsn(position) - parse_lsn(m.start_lsn),
            "rows": ids}


async def snapshots(job: Job) -> int:
    """How many snapshots (base backups, here) the store holds for the job."""
    store = open_store(job.store_url, s3_endpoint=job.s3_endpoint)
    try:
        keys = [o.key for o in await store.list(f"{job.name}/snapshots/")]
    finally:
        await store.close()
    return sum(k.endswith("/manifest.json") for k in keys)


def lost(acked: list[int], rows: set[int], ack_time: dict[int, float], killed: float
         ) -> dict[str, Any]:
    missing = [i for i in acked if i not in rows]
    window = max((killed - ack_time[i] for i in missing), default=0.0)
    return {"acknowledged": len(acked), "lost": len(missing), "lost_within_s": round(window, 2)}


async def trial(root: Path, store_url: str, s3_endpoint: str | None, duration: float,
                size: int) -> dict[str, Any]:
    job = Job(root, "aged", store_url, s3_endpoint)
    job.base.mkdir()
    give_to_postgres(job.base)
    init_pgdata(job.pgdata, job.name, spool=job.spool)
    try:
        await asyncio.to_thread(job.inst.start)
        job.inst.psql("create table ledger (id int primary key, v text)", database="job_aged")
        job.serve()
        await until(lambda: asyncio.to_thread(lambda: bool(job.status()["last_base_backup"])),
                    "the first base backup", 300, 0.5)
        acked: list[int] = []
        log(f"writing {size / 1e6:g} MB over {duration:g} s")
        t_write = time.time()
        await write(job, duration, size, acked)
        # When each row was acknowledged: the rate was steady, so interpolate.
        spacing = duration / max(len(acked), 1)
        ack_time = {i: t_write + k * spacing for k, i in enumerate(acked)}
        table = job.inst.psql("select pg_table_size('ledger')", database="job_aged").strip()
        base_backups = await snapshots(job)
        killed = time.time()
        job.lose_machine()
        log("machine lost; recovering from the store")
        aged = await recover(job)
        aged_rows = aged.pop("rows")
        aged.update(lost(acked, aged_rows, ack_time, killed),
                    table_bytes=int(table), age_s=duration, snapshots_stored=base_backups)
        log(json.dumps(aged))

        # The floor: the same job right after its new timeline's base backup.
        job.serve()
        first = aged["snapshot"]
        await until(lambda: asyncio.to_thread(
            lambda: (job.status()["last_base_backup"] or {}).get("id", first) != first),
            "the base backup after the recovery", 900, 0.5)
        killed = time.time()
        job.lose_machine()
        fresh = await recover(job)
        survived = [i for i in acked if i in aged_rows]  # what the first recovery kept
        fresh.update(lost(survived, fresh.pop("rows"), ack_time, killed),
                     table_bytes=int(table), age_s=0)
        log(json.dumps(fresh))
        return {"aged": aged, "just_backed_up": fresh}
    finally:
        job.stop()


def table(r: dict[str, Any]) -> str:
    lines = ["| job | snapshot | restored | WAL replayed | restore | start+replay | total "
             "| acked lost |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, key in (("written for the hour", "aged"), ("just backed up", "just_backed_up")):
        x = r[key]
        lines.append(f"| {label} | {x['kind']} | {x['bytes_restored'] / 1e6:,.1f} MB "
                     f"| {x['wal_replayed_bytes'] / 1e6:,.1f} MB | {x['restore_s']:.2f} s "
                     f"| {x['start_and_replay_s']:.2f} s | {x['total_s']:.2f} s "
                     f"| {x['lost']} of {x['acknowledged']} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="jobmesh-recovery-age-"))
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
            store_url = f"s3://{server.create_bucket('recovery-age')}/jobs"
            s3_endpoint = server.endpoint
        else:
            (root / "store").mkdir()
            store_url = f"file://{root / 'store'}"
        result = await trial(root, store_url, s3_endpoint, args.duration, args.size_mb * 10**6)
        report = {"machine": {"cores": os.cpu_count(), "platform": platform.platform()},
                  "store": args.store, "duration": args.duration, "size_mb": args.size_mb,
                  "defaults": {"wal_window": defaults.WAL_WINDOW,
                               "base_backup_interval": defaults.BASE_BACKUP_INTERVAL,
                               "base_backup_wal_bytes": defaults.BASE_BACKUP_WAL_BYTES},
                  **result}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "recovery_age.json").write_text(json.dumps(report, indent=2) + "\n")
        print(table(result))
        return 0
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=3600, help="seconds of writing")
    p.add_argument("--size-mb", type=float, default=100, help="table size at the end (MB)")
    p.add_argument("--store", choices=["file", "s3"], default="file")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
