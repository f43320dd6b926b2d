"""What bench/backup.py runs against: one PostgreSQL 15, pgBackRest, and moto's S3 server,
and ``Tools``, which takes and restores one backup with each of them.

Each ``start_*`` function registers its own cleanup on the ExitStack it is
given, so whatever fails later (or Ctrl-C) still stops what was started.
pgBackRest runs as the Postgres OS user, as it would beside a real cluster:
Postgres itself calls it as ``archive_command``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _peers import REPO, BenchError

from jobmesh.agent.postgres import Instance, PostgresError, free_port, give_to_postgres, run_pg
from jobmesh.agent.store import Store, open_store
from tests.support.s3 import running_s3_server

PGBACKREST = Path("/usr/bin/pgbackrest")
DATABASE = "job_bench"
JOB = "bench"
STANZA = "bench"  # full backups, and the archive Postgres pushes to
WAL_STANZA = "walbench"  # archive-push timings only, emptied before each round
BUCKET = "jobmesh-bench"
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def ensure_pgbackrest() -> None:
    """Install Debian's pgbackrest if missing (it ships no service to keep from starting)."""
    if PGBACKREST.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "pgbackrest"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise BenchError(f"{' '.join(cmd)} failed: {tail[-1] if tail else proc.returncode}")
    if not PGBACKREST.exists():
        raise BenchError(f"apt-get install pgbackrest did not provide {PGBACKREST}")


def pgbackrest_version() -> str:
    return subprocess.run([str(PGBACKREST), "version"], capture_output=True, text=True,
                          check=False).stdout.strip()


# --- PostgreSQL -------------------------------------------------------------------------


def start_postgres(stack: contextlib.ExitStack, root: Path, walpool: Path) -> Instance:
    """A fresh cluster archiving every segment into ``walpool`` (real segments for the WAL
    timings); bench_settings switches archiving to pgBackRest once the data is loaded."""
    walpool.mkdir()
    give_to_postgres(walpool)
    inst = Instance(root / "pgdata", port=free_port(), settings={
        "fsync": "off", "synchronous_commit": "off", "shared_buffers": "256MB",
        "wal_level": "replica", "archive_mode": "on", "max_wal_size": "4GB",
        "checkpoint_timeout": "30min",
        "archive_command": f"test ! -f {walpool}/%f && cp %p {walpool}/%f",
    })
    inst.initdb()
    stack.callback(inst.stop_quietly)
    inst.start()
    return inst


def archive_with_pgbackrest(inst: Instance, config: Path) -> None:
    """Restart the cluster with ``archive_command`` = pgbackrest archive-push, and the
    default WAL sizes (the load ran with few checkpoints), then checkpoint: pg_wal keeps
    what a cluster with default settings would."""
    inst.stop("fast")
    inst.settings["archive_command"] = (f"{PGBACKREST} --config={config} --stanza={STANZA} "
                                        "archive-push %p")
    del inst.settings["max_wal_size"], inst.settings["checkpoint_timeout"]
    start_instance(inst)
    inst.psql("CHECKPOINT")


def pgdata_bytes(pgdata: Path) -> tuple[int, int]:
    """(all files, pg_wal only) in bytes."""
    total = wal = 0
    for dirpath, _dirs, files in os.walk(pgdata):
        for name in files:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
            total += size
            if Path(dirpath).relative_to(pgdata).parts[:1] == ("pg_wal",):
                wal += size
    return total, wal


# --- pgBackRest -------------------------------------------------------------------------


@dataclass
class PgBackRest:
    config: Path
    repo: Path
    inst: Instance

    def run(self, *args: str, timeout: float = 1800) -> str:
        """One pgbackrest command as the Postgres OS user; BenchError with its stderr tail."""
        try:
            proc = run_pg([str(PGBACKREST), f"--config={self.config}", *args], check=False,
                          timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"pgbackrest {' '.join(args)} timed out") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BenchError(f"pgbackrest {' '.join(args)} exited {proc.returncode}: {tail}")
        return proc.stdout

    def wipe_wal_archive(self) -> None:
        """Forget the segments archive-push put in the WAL stanza (keeps archive.info), so the
        next round pushes them again instead of finding them already there."""
        archive = self.repo / "archive" / WAL_STANZA
        for child in archive.glob("*/*"):
            if child.is_dir():
                shutil.rmtree(child)


def setup_pgbackrest(root: Path, inst: Instance, processes: int) -> PgBackRest:
    base = root / "pgbackrest"
    repo = base / "repo"
    for d in (base, repo, base / "log", base / "lock", base / "spool"):
        d.mkdir(exist_ok=True)
    pg = (f"pg1-path={inst.datadir}\npg1-port={inst.port}\npg1-socket-path={inst.socket_dir}\n"
          "pg1-user=postgres\n")
    config = base / "pgbackrest.conf"
    config.write_text(f"""\
[global]
repo1-path={repo}
repo1-retention-full=1
compress-type=zst
process-max={processes}
start-fast=y
log-path={base / 'log'}
lock-path={base / 'lock'}
spool-path={base / 'spool'}
log-level-console=warn
log-level-file=info

[{STANZA}]
{pg}
[{WAL_STANZA}]
{pg}""")
    give_to_postgres(base)
    return PgBackRest(config, repo, inst)


# --- moto ---------------------------------------------------------------------------------


def start_moto(stack: contextlib.ExitStack) -> str:
    """moto's S3 server on a free loopback port with one bucket; returns its endpoint."""
    try:
        endpoint = stack.enter_context(running_s3_server()).endpoint
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc
    os.environ.update(MOTO_ENV)
    import boto3  # moto depends on it

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET)
    return endpoint


def start_instance(inst: Instance) -> None:
    try:
        inst.start()
    except PostgresError as exc:
        log = inst.logfile.read_text()[-1500:] if inst.logfile.exists() else ""
        raise BenchError(f"PostgreSQL on {inst.datadir} did not start: {exc}\n{log}") from exc


@contextlib.contextmanager
def timed(cpu_of: int) -> Iterator[dict[str, float]]:
    """Wall and CPU seconds of the block (CPU of this process or of waited-for children)."""
    out: dict[str, float] = {}
    before, started = resource.getrusage(cpu_of), time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - started
    after = resource.getrusage(cpu_of)
    out["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# --- the database ---------------------------------------------------------------------


def load(inst: Instance, scale: int) -> None:
    inst.psql(f"CREATE DATABASE {DATABASE}")
    cmd = ["pgbench", "-i", "-q", "-s", str(scale), "-h", str(inst.socket_dir),
           "-p", str(inst.port), "-U", "postgres", DATABASE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise BenchError(f"pgbench -i failed: {proc.stderr.strip()[-300:]}")
    inst.psql("CHECKPOINT")


def content(inst: Instance) -> str:
    """A digest of the data, to check that a restore brought back the same database."""
    return inst.psql("SELECT count(*) || ' rows, abalance sum ' || sum(abalance) || ', md5 ' || "
                     "md5(string_agg(aid::text || ':' || abalance, ',' ORDER BY aid)) "
                     "FROM pgbench_accounts", database=DATABASE)


def ensure(inst: Instance, running: bool) -> None:
    if inst.is_running() == running:
        return
    if running:
        start_instance(inst)
    else:
        inst.stop("fast")


# --- one backup or restore --------------------------------------------------------------


class Tools:
    """Runs each tool's backup and restore, keeping what the restore needs."""

    def __init__(self, root: Path, inst: Instance, pgbr: PgBackRest, endpoint: str):
        self.root, self.inst, self.pgbr, self.endpoint = root, inst, pgbr, endpoint
        self.store_root = root / "jobmesh-store"
        self.store_root.mkdir()
        self.urls = {"jobmesh_file": f"file://{self.store_root}",  # WAL pushes; a backup
                     "jobmesh_s3": f"s3://{BUCKET}/jobs"}  # gets a store of its own
        self.rounds = 0
        self.snapshot_ids: dict[str, str] = {}

    def store(self, tool: str) -> Store:
        return open_store(self.urls[tool], s3_endpoint=self.endpoint)

    def _fresh_store(self, tool: str) -> None:
        """A full snapshot, as pgBackRest's full backup: objects are content-addressed and
        shared, so a second snapshot into the same store would upload only what changed;
        each round gets an empty store (and the hash cache beside PGDATA goes)."""
        self.rounds += 1
        if tool == "jobmesh_file":
            path = self.store_root / f"round-{self.rounds}"
            path.mkdir()
            give_to_postgres(path)
            self.urls[tool] = f"file://{path}"
        else:
            self.urls[tool] = f"s3://{BUCKET}/round-{self.rounds}"
        (self.inst.datadir / ".jobmesh-hashes").unlink(missing_ok=True)

    def backup(self, tool: str) -> dict[str, float]:
        if tool == "pgbackrest":
            ensure(self.inst, running=True)
            with timed(resource.RUSAGE_CHILDREN) as t:
                self.pgbr.run(f"--stanza={STANZA}", "--type=full", "backup")
            info = json.loads(self.pgbr.run(f"--stanza={STANZA}", "--output=json",
                                            "info"))[0]["backup"][-1]["info"]
            return {**t, "stored_bytes": info["repository"]["size"],
                    "source_bytes": info["size"]}
        from jobmesh.agent.snapshot import take_snapshot

        ensure(self.inst, running=False)
        self._fresh_store(tool)

        async def go() -> Any:
            store = self.store(tool)
            try:
                return await take_snapshot(self.inst.datadir, store, JOB)
            finally:
                await store.close()

        with timed(resource.RUSAGE_SELF) as t:
            manifest = asyncio.run(go())
        self.snapshot_ids[tool] = manifest.id
        return {**t, "stored_bytes": manifest.stored_size,
                "source_bytes": manifest.uncompressed_size}

    def restore(self, tool: str, target: Path) -> dict[str, float]:
        if tool == "pgbackrest":
            target.mkdir()
            give_to_postgres(target)
            with timed(resource.RUSAGE_CHILDREN) as t:
                self.pgbr.run(f"--stanza={STANZA}", f"--pg1-path={target}",
                              "--type=immediate", "--target-action=promote", "restore")
            return dict(t)
        from jobmesh.agent.restore import restore

        async def go() -> None:
            store = self.store(tool)
            try:
                await restore(target, store, JOB, snapshot_id=self.snapshot_ids[tool],
                              s3_endpoint=self.endpoint)
            finally:
                await store.close()

        with timed(resource.RUSAGE_SELF) as t:
            asyncio.run(go())
        return dict(t)

    def forget(self, tool: str) -> None:
        """Drop a jobmesh snapshot once restored (pgBackRest expires its own)."""
        sid = self.snapshot_ids.pop(tool, None)
        if sid is None:
            return

        async def go() -> None:
            store = self.store(tool)  # the round's own store: all of it goes
            try:
                await store.delete_many([o.key for o in await store.list("")])
            finally:
                await store.close()

        asyncio.run(go())


def cli_push(store_url: str, job: str, seg: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "agent", "wal-push", "--store",
                           store_url, "--job", job, str(seg)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise BenchError(f"jobmesh agent wal-push exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-300:]}")
