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


def test_an_export_imports_into_a_new_job_through_the_cli(up: Up, tmp_path: Path) -> None:
    made = up.psql(up.admin_dsn(), "CREATE TABLE IF NOT EXISTS pages (id serial PRIMARY KEY,"
                   " url text); INSERT INTO pages (url) SELECT 'u' || g"
                   " FROM generate_series(1, 50) g; CREATE OR REPLACE VIEW n AS"
                   " SELECT count(*) FROM pages")
    assert made.returncode == 0, made.stderr
    before = up.psql(up.admin_dsn(), "SELECT count(*) || ':' || max(id) FROM pages").stdout
    dump = tmp_path / "demo.pgdump"
    exported = up.cli("job", "export", "demo", "-o", str(dump), timeout=120)
    assert exported.returncode == 0, exported.stderr
    imported = up.cli("job", "import", "demo-copy", str(dump), timeout=180)
    assert imported.returncode == 0, imported.stderr
    after = up.psql(up.admin_dsn("demo-copy"), "SELECT count(*) || ':' || max(id) FROM pages")
    assert after.returncode == 0 and after.stdout == before, after.stderr
    grown = up.psql(up.admin_dsn("demo-copy"), "INSERT INTO pages (url) VALUES ('x')"
                    " RETURNING id")
    assert grown.returncode == 0, grown.stderr
    assert int(grown.stdout.split()[0]) > int(before.split(":")[1])  # the sequence went on


def test_a_reader_pg_dumps_a_job_through_the_router_and_cannot_write(
        up: Up, tmp_path: Path) -> None:
    made = up.cli("user", "create", "analyst-e2e", "--password-stdin", stdin="reader-pw-1\n")
    assert made.returncode == 0, made.stderr
    granted = up.cli("grant", "analyst-e2e", "demo", "--read")
    assert granted.returncode == 0, granted.stderr
    up.psql(up.admin_dsn(), "CREATE TABLE IF NOT EXISTS serials (id serial, x int);"
            " INSERT INTO serials (x) VALUES (1)")
    dsn = f"postgresql://analyst-e2e:reader-pw-1@127.0.0.1:{up.port}/job_demo"
    out = tmp_path / "by-reader.pgdump"
    dumped = subprocess.run([str(bin_dir() / "pg_dump"), "-Fc", "-f", str(out), dsn],
                            capture_output=True, text=True, timeout=120)
    assert dumped.returncode == 0, dumped.stderr
    assert out.stat().st_size > 0
    for sql in ("INSERT INTO serials (x) VALUES (2)", "CREATE TEMP TABLE t (x int)",
                "SELECT lo_create(0)", "SELECT nextval('serials_id_seq')"):
        # A read-write transaction, so that only privileges stand in the way.
        refused = up.psql(dsn, f"BEGIN READ WRITE; {sql}; COMMIT")
        assert refused.returncode != 0 and "permission denied" in refused.stderr, sql


def test_the_line_job_create_prints_connects_once_the_password_is_filled_in(up: Up) -> None:
    made = up.cli("job", "create", "printed", timeout=120)
    assert made.returncode == 0, made.stderr
    line = next(ln for ln in made.stdout.splitlines() if ln.startswith("connect: psql "))
    dsn = line.removeprefix("connect: psql ").strip('"')
    assert "<password>" in dsn
    password = (up.state / "admin-password").read_text().strip()
    out = up.psql(dsn.replace("<password>", password), "SELECT current_database()")
    assert out.returncode == 0 and out.stdout.strip() == "job_printed", out.stderr


def test_jobmesh_psql_as_another_user_through_the_router(up: Up) -> None:
    made = up.cli("user", "create", "psql-user", "--password-stdin", stdin="psql-pw-1\n")
    assert made.returncode == 0, made.stderr
    assert up.cli("grant", "psql-user", "demo", "--read").returncode == 0
    env = {**os.environ, "JOBMESH_STATE_DIR": str(up.state), "PGPASSWORD": "psql-pw-1"}
    ran = subprocess.run([sys.executable, "-m", "jobmesh", "psql", "demo", "--user", "psql-user",
                          "-X", "-A", "-t", "-c", "SELECT current_user"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "job_reader"  # a read grant logs in as the job's reader
    # The new password works; `user passwd` then replaces it.
    changed = up.cli("user", "passwd", "psql-user", "--password-stdin", stdin="psql-pw-2\n")
    assert changed.returncode == 0, changed.stderr
    old = subprocess.run([sys.executable, "-m", "jobmesh", "psql", "demo", "--user",
                          "psql-user", "-X", "-c", "SELECT 1"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert old.returncode != 0 and "password authentication failed" in old.stderr
