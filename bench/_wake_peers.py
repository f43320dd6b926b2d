"""What a wake is compared with in bench/wake.py: the floor and pgBackRest.

- The floor: a job's PGDATA already restored on disk (cleanly shut down), started
  with ``pg_ctl start`` and the same per-job command line the local backend gives
  (port, sockets, spool, archive_timeout), then connect and first row. No
  restore, no control plane, no router: what a wake cannot go below.
- pgBackRest: the same PGDATA as an offline full backup (``backup --no-online``,
  zst, process-max = cores) in a posix repository on the same disk as the jobmesh
  file:// store, the closest pgBackRest gets to a pause snapshot (a clean shutdown,
  no WAL needed); a wake is ``restore`` (type none: no recovery, as pgBackRest
  restores offline backups by default) into an empty directory, ``pg_ctl start``,
  connect, first row.

Both start PostgreSQL without ``-w`` (pg_ctl would look only every 100 ms) and
connect every 5 ms until it accepts, as a client would. Every instance started
here is stopped by ``stop_all`` (registered by the caller on its ExitStack).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from _backup_peers import PGBACKREST
from _peers import BenchError
from _wake_mesh import poll_first_row, stop_pgdata

from jobmesh.agent.postgres import bin_dir, free_port, give_to_postgres, run_pg
from jobmesh.agent.restore import restore
from jobmesh.agent.store import open_store
from jobmesh.controller.backends.local.process import JobDir, postgres_settings, prepare

SQL = "SELECT 1 FROM t LIMIT 1"


@dataclass
class Direct:
    """How a client reaches a job's Postgres without the router (its own roles)."""

    job_id: str
    password: str  # the job's backend password: job_owner logs in with it

    @property
    def database(self) -> str:
        return f"job_{self.job_id}"


@dataclass
class Instances:
    """Every PGDATA this module started, for the teardown."""

    started: set[Path] = field(default_factory=set)

    def stop_all(self) -> None:
        for pgdata in self.started:
            stop_pgdata(pgdata)


async def restore_copy(root: Path, store_url: str, job_id: str) -> JobDir:
    """The job's latest snapshot restored under ``root`` (laid out as a job directory)."""
    jd = JobDir(root, job_id)
    (root / "jobs").mkdir(parents=True, exist_ok=True, mode=0o755)
    (root / "jobs").chmod(0o755)
    await asyncio.to_thread(prepare, jd)
    store = open_store(store_url)
    try:
        result = await restore(jd.pgdata, store, job_id)
    finally:
        await store.close()
    if result.recovery_configured:
        raise BenchError(f"job {job_id}'s latest snapshot needs WAL replay: not a pause "
                         "snapshot of a cleanly stopped job")
    await asyncio.to_thread(give_to_postgres, jd.pgdata)
    return jd


async def start_to_first_row(jd: JobDir, who: Direct, instances: Instances) -> float:
    """``pg_ctl start`` of the PGDATA in place, then connect + first row; seconds.
    Leaves it running (``stop`` shuts it down cleanly, untimed)."""
    port = free_port()
    settings = postgres_settings(jd, port, 60)
    opts = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())
    instances.started.add(jd.pgdata)
    started = time.perf_counter()
    proc = await asyncio.to_thread(
        run_pg, [str(bin_dir() / "pg_ctl"), "start", "-W", "-D", str(jd.pgdata), "-l",
                 str(jd.postgres_log), "-o", opts], check=False, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"pg_ctl start of {jd.pgdata} failed: {proc.stderr.strip()[-300:]}")
    done = await poll_first_row(host="127.0.0.1", port=port, user="job_owner",
                                password=who.password, database=who.database, sql=SQL)
    return done - started


def stop(jd: JobDir) -> None:
    """A clean (fast) shutdown, so the next start needs no crash recovery."""
    run_pg([str(bin_dir() / "pg_ctl"), "stop", "-D", str(jd.pgdata), "-m", "fast", "-w",
            "-t", "120"], timeout=130)


async def floor_round(jd: JobDir, who: Direct, instances: Instances) -> dict[str, float]:
    await asyncio.to_thread(os.sync)
    seconds = await start_to_first_row(jd, who, instances)
    await asyncio.to_thread(stop, jd)
    return {"ms": round(seconds * 1000, 1)}


# --- pgBackRest -----------------------------------------------------------------------------


class PgBackRest:
    """One stanza per job, each an offline full backup of the job's restored PGDATA."""

    def __init__(self, root: Path, processes: int) -> None:
        self.base = root
        self.repo = root / "repo"
        self.config = root / "pgbackrest.conf"
        self.processes = processes
        self.stanzas: dict[str, Path] = {}

    def _run(self, *args: str, timeout: float = 1800) -> str:
        """One pgbackrest command as the Postgres OS user (as beside a real cluster)."""
        try:
            proc = run_pg([str(PGBACKREST), f"--config={self.config}", *args], check=False,
                          timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"pgbackrest {' '.join(args)} timed out") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BenchError(f"pgbackrest {' '.join(args)} exited {proc.returncode}: {tail}")
        return proc.stdout

    def setup(self, sources: dict[str, Path]) -> None:
        for d in (self.base, self.repo, self.base / "log", self.base / "lock",
                  self.base / "spool"):
            d.mkdir(exist_ok=True, mode=0o755)
        stanzas = "".join(f"[{job_id}]\npg1-path={pgdata}\n\n" for job_id, pgdata in
                          sources.items())
        self.config.write_text(f"""\
[global]
repo1-path={self.repo}
repo1-retention-full=1
compress-type=zst
process-max={self.processes}
log-path={self.base / 'log'}
lock-path={self.base / 'lock'}
spool-path={self.base / 'spool'}
log-level-console=warn
log-level-file=info

{stanzas}""")
        give_to_postgres(self.base)
        self.stanzas = dict(sources)

    def backup(self, job_id: str) -> dict[str, float]:
        """stanza-create and an offline full backup; returns its seconds and sizes."""
        self._run(f"--stanza={job_id}", "--no-online", "stanza-create")
        started = time.perf_counter()
        self._run(f"--stanza={job_id}", "--no-online", "--type=full", "backup")
        seconds = time.perf_counter() - started
        info = json.loads(self._run(f"--stanza={job_id}", "--output=json", "info"))
        last = info[0]["backup"][-1]["info"]
        return {"seconds": round(seconds, 2), "stored_bytes": last["repository"]["size"],
                "source_bytes": last["size"]}

    async def wake_round(self, root: Path, job_id: str, who: Direct,
                         instances: Instances) -> dict[str, float]:
        """restore into an empty job directory, start, first row; stopped afterwards."""
        jd = JobDir(root, job_id)
        stop_pgdata(jd.pgdata)
        await asyncio.to_thread(shutil.rmtree, jd.path, True)
        (root / "jobs").mkdir(parents=True, exist_ok=True, mode=0o755)
        (root / "jobs").chmod(0o755)
        await asyncio.to_thread(prepare, jd)
        jd.pgdata.mkdir(mode=0o700)
        give_to_postgres(jd.pgdata)
        await asyncio.to_thread(os.sync)
        started = time.perf_counter()
        await asyncio.to_thread(self._run, f"--stanza={job_id}", f"--pg1-path={jd.pgdata}",
                                "restore")
        restored = time.perf_counter()
        start_s = await start_to_first_row(jd, who, instances)
        total = time.perf_counter() - started
        await asyncio.to_thread(stop, jd)
        return {"ms": round(total * 1000, 1), "restore_ms": round((restored - started) * 1000, 1),
                "start_to_row_ms": round(start_s * 1000, 1)}
