"""PostgreSQL clusters with known contents, and the ``jobmesh agent`` CLI, for agent tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobmesh.agent.postgres import Instance, bin_dir, free_port, run_pg
from tests.support.postgres import PgFactory


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(3).hex()}"


def cluster(pg_factory: PgFactory, name: str) -> Instance:
    """A fresh, running cluster with database job_alpha."""
    return pg_factory(unique(name))


def start_restored(pgdata: Path, started: list[Instance]) -> Instance:
    inst = Instance(pgdata, port=free_port(), settings={"fsync": "off"})
    started.append(inst)
    inst.start()
    return inst


def fill(inst: Instance, *, rows: int = 1000, tag: str = "v1") -> None:
    """pgbench -i -s 1 and a table of known rows, in job_alpha."""
    run_pg([str(bin_dir() / "pgbench"), "-i", "-q", "-s", "1", "-h", str(inst.socket_dir),
            "-p", str(inst.port), "-U", "postgres", "job_alpha"])
    inst.psql("create table known (id int primary key, tag text, payload text)",
              database="job_alpha")
    inst.psql(f"insert into known select g, '{tag}', md5(g::text) "
              f"from generate_series(1, {rows}) g", database="job_alpha")


TABLES = {"pgbench_accounts": "aid", "pgbench_branches": "bid", "pgbench_tellers": "tid",
          "known": "id"}


def checksums(inst: Instance) -> dict[str, str]:
    """md5 of every row of each table, in key order: equal means equal contents."""
    return {t: inst.psql(f"select count(*) || ':' || md5(string_agg(x::text, ',' order by {k})) "
                         f"from {t} x", database="job_alpha")
            for t, k in TABLES.items()}


def agent(*args: str, check: bool = False,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``jobmesh agent ARGS`` as a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "agent", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc
