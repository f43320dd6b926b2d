"""`jobmesh job import` of a damaged dump against a real controller on the local backend:
the load fails in a way retrying cannot fix, so the CLI says so at once, in one line,
`job show` shows it, and `job delete` removes the job.

Real processes throughout: `jobmesh controller` (local backend, template store) on a
fresh catalog, the CLI as a subprocess, and a real pg_dump, truncated after its
table of contents (which the CLI and the API check) so that its data breaks off.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobmesh.agent.postgres import Instance, bin_dir
from jobmesh.controller.mesh import ensure_secret, write_mesh
from tests.support.mesh import Mesh
from tests.support.postgres import SUPERUSER_PASSWORD

pytestmark = pytest.mark.timeout(240)


def damaged_dump(pg: Instance, out: Path) -> Path:
    """A real ``pg_dump -Fc`` of a database with a table of data, cut in half."""
    db = f"dump_src_{os.urandom(3).hex()}"
    pg.psql(f"CREATE DATABASE {db}")
    try:
        pg.psql("CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v"
                " FROM generate_series(1, 100000) g", database=db)
        whole = out.with_suffix(".whole")
        subprocess.run([str(bin_dir() / "pg_dump"), "-Fc", "-f", str(whole),
                        f"postgresql://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{pg.port}/{db}"],
                       check=True, capture_output=True, timeout=120)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    data = whole.read_bytes()
    out.write_bytes(data[:len(data) // 2])
    whole.unlink()
    return out


async def cli(mesh: Mesh, *args: str) -> tuple[int, str, str]:
    """``python -m jobmesh ARGS`` against ``mesh``: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobmesh", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "JOBMESH_STATE_DIR": str(mesh.root)})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_an_import_of_a_damaged_dump_fails_within_30_s_with_one_clear_line(
        mesh: Mesh, pg: Instance, tmp_path: Path) -> None:
    dump = await asyncio.to_thread(damaged_dump, pg, tmp_path / "broken.pgdump")
    await asyncio.to_thread(mesh.start_controller, "--idle-timeout", "0")
    ensure_secret(mesh.root / "admin-password")
    write_mesh(mesh.root, f"http://127.0.0.1:{mesh.api_port}", "127.0.0.1", 16432, "admin")

    started = time.monotonic()
    code, out, err = await cli(mesh, "job", "import", "broken", str(dump))
    assert time.monotonic() - started < 30
    assert code == 1 and "Traceback" not in err, err
    *upload, line = err.strip().splitlines()
    assert all(u.startswith(f"importing {dump}") for u in upload), err  # the progress lines
    assert line.startswith("jobmesh job import: job broken: cannot import "), line
    assert "it will not be retried" in line and "`jobmesh job retry broken`" in line, line

    code, out, err = await cli(mesh, "job", "show", "broken")
    assert code == 0, err
    assert "  state:       creating (wanted running)" in out
    error = next(ln for ln in out.splitlines() if ln.startswith("  error:"))
    assert "cannot import" in error and "broken" in error
    assert "  attempts:    1, gave up: it will not be retried" in out
    job = await mesh.catalog.job("broken")
    assert job is not None and job.gave_up and job.attempts == 1

    code, out, err = await cli(mesh, "job", "delete", "broken", "--timeout", "60")
    assert (code, out.strip()) == (0, "job broken: deleted"), err
    assert await mesh.catalog.job("broken") is None
