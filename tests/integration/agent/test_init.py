"""``agent init --role-password-env``: a new cluster that serves over TCP at once, as a
Kubernetes job pod's init step makes it (the local backend's template does the same)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from jobmesh.agent.errors import AgentError
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.postgres import Instance, free_port

pytestmark = pytest.mark.timeout(120)
PASSWORD = "it's a \\secret$"


@pytest.fixture
def base(pg_root: Path) -> Iterator[Path]:
    d = pg_root / f"init-{os.urandom(3).hex()}"
    yield d
    inst = Instance(d / "pgdata", port=0)
    if (d / "pgdata" / "postmaster.pid").exists():
        inst.stop_quietly()


def init_by_cli(base: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobmesh", "agent", "init", "--pgdata", str(base / "pgdata"),
         "--job", "served", "--spool", str(base / "spool"), "--role-password-env",
         "JOB_PASSWORD"], capture_output=True, text=True, timeout=90,
        env={**os.environ, **env})


async def test_roles_log_in_over_tcp_with_the_password_from_the_environment(
        base: Path) -> None:
    proc = init_by_cli(base, {"JOB_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    inst = Instance(base / "pgdata", port=free_port())
    inst.start()
    dsn = dict(host="127.0.0.1", port=inst.port, database="job_served", password=PASSWORD)
    owner = await asyncpg.connect(user="job_owner", **dsn)
    try:
        await owner.execute("create table t as select 1 as x")
        assert await owner.fetchval(
            "select count(*) from pg_extension where extname in ('dblink', 'postgres_fdw')") == 2
        await owner.execute("create server other foreign data wrapper postgres_fdw")
    finally:
        await owner.close()
    reader = await asyncpg.connect(user="job_reader", **dsn)
    try:
        assert await reader.fetchval("select x from t") == 1
        assert await reader.fetchval("show default_transaction_read_only") == "on"
    finally:
        await reader.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(user="job_owner", **{**dsn, "password": "wrong"})
    hba = (base / "pgdata" / "pg_hba.conf").read_text()
    assert "0.0.0.0/0     scram-sha-256" in hba and "trust" in hba


def test_the_password_is_in_no_file_of_pgdata(base: Path) -> None:
    init_pgdata(base / "pgdata", "served", spool=base / "spool", role_password=PASSWORD)
    for path in (base / "pgdata").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_a_missing_password_variable_is_one_clear_line(base: Path) -> None:
    proc = init_by_cli(base, {"JOB_PASSWORD": ""})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "jobmesh agent init: --role-password-env: environment variable JOB_PASSWORD is not "
        "set or empty"]
    assert not (base / "pgdata").exists()


def test_without_the_option_roles_stay_nologin(base: Path) -> None:
    init_pgdata(base / "pgdata", "served", spool=base / "spool")
    inst = Instance(base / "pgdata", port=free_port())
    inst.start()
    try:
        assert inst.psql("select string_agg(rolname || ':' || rolcanlogin, ',' order by rolname)"
                         " from pg_roles where rolname like 'job_%'") == \
            "job_owner:false,job_reader:false"
    finally:
        inst.stop("fast")


def test_an_empty_password_is_refused(base: Path) -> None:
    with pytest.raises(AgentError, match="empty"):
        init_pgdata(base / "pgdata", "served", spool=base / "spool", role_password="")
