"""``jobmesh up`` itself, as the README's first command runs it: one real mesh (catalog,
controller, router, a demo job) for the whole module, driven by real clients and the CLI.

The mesh is stopped with Ctrl-C (SIGINT) at the end, as a user stops it, and anything
of it still running afterwards is killed, also when a test failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobmesh.agent.postgres import bin_dir, free_port
from tests.support.mesh import kill_processes_mentioning, pids_mentioning
from tests.support.process import LoggedProcess

pytestmark = pytest.mark.timeout(240)


@dataclass
class Up:
    state: Path
    port: int
    proc: LoggedProcess

    def cli(self, *args: str, timeout: float = 60,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "jobmesh", *args],
                              capture_output=True, text=True, timeout=timeout, input=stdin,
                              env={**os.environ, "JOBMESH_STATE_DIR": str(self.state)})

    def psql(self, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir() / "psql"), "-X", "-A", "-t", "-v",
                               "ON_ERROR_STOP=1", dsn, "-c", sql],
                              capture_output=True, text=True, timeout=60)

    def admin_dsn(self, job: str = "demo") -> str:
        password = (self.state / "admin-password").read_text().strip()
        return f"postgresql://admin:{password}@127.0.0.1:{self.port}/job_{job}"


@pytest.fixture(scope="module")
def up(pg_root: Path) -> Iterator[Up]:
    state = pg_root / f"up-{uuid.uuid4().hex[:8]}"
    port = free_port()
    proc = LoggedProcess(
        "jobmesh up",
        [sys.executable, "-m", "jobmesh", "up", "--state-dir", str(state), "--port", str(port),
         "--demo-job", "demo", "--idle-timeout", "0"],
        state.with_suffix(".log"), with_stdout=True)
    try:
        proc.wait_for_log(r"jobmesh is up", timeout=180)
        yield Up(state, port, proc)
    finally:
        if proc.proc.poll() is None:
            proc.signal(signal.SIGINT)  # as Ctrl-C: pause the jobs, stop
            try:
                proc.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        kill_processes_mentioning(str(state))


def test_the_demo_job_serves_the_admin_through_the_router(up: Up) -> None:
    out = up.psql(up.admin_dsn(), "CREATE TABLE IF NOT EXISTS t (x int); "
                  "INSERT INTO t VALUES (1); SELECT count(*) > 0 FROM t")
    assert out.returncode == 0 and out.stdout.split()[-1] == "t", out.stderr


def test_a_second_up_on_the_same_state_directory_fails_at_once_naming_the_first(
        up: Up) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "jobmesh", "up", "--state-dir", str(up.state),
         "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"pid {up.proc.proc.pid}" in lines[0] and str(up.state) in lines[0]
    assert "Traceback" not in second.stderr
    # The first mesh was not touched: its router still serves, its files are its own.
    out = up.psql(up.admin_dsn(), "SELECT 1")
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    assert f"127.0.0.1:{up.port}" not in second.stdout


def secrets_of(up: Up) -> dict[str, str]:
    """Every secret of the mesh: its files, and each job's backend password."""
    found = {name: (up.state / name).read_text().strip()
             for name in ("catalog-password", "admin-password", "api-token")}
    dsn = (up.state / "router-catalog-dsn").read_text().strip()
    rows = up.psql(dsn, "SELECT id || ' ' || backend_password FROM jobs")
    assert rows.returncode == 0, rows.stderr
    for line in rows.stdout.split("\n"):
        if line.strip():
            job, password = line.split(" ", 1)
            found[f"job {job}"] = password
    return found


def test_no_process_of_the_mesh_has_a_secret_on_its_command_line(up: Up) -> None:
    assert up.psql(up.admin_dsn(), "SELECT 1").returncode == 0  # the demo job is running
    found = secrets_of(up)
    assert len(found) >= 4
    pids = set(pids_mentioning(str(up.state))) | {up.proc.proc.pid}
    assert len(pids) >= 4, pids  # up, the router, the catalog's and the job's PostgreSQL
    for pid in sorted(pids):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        for what, secret in found.items():
            assert secret not in argv, f"{what} is on pid {pid}'s command line"
    mode = (up.state / "router-catalog-dsn").stat().st_mode & 0o777
    assert mode == 0o600
