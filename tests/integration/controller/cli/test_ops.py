"""The operator CLI (`jobmesh job|user|grant|revoke|psql|status`) as a subprocess against a
real API on loopback, found through a state directory as `jobmesh up` leaves it.

No controller runs: where a command waits for a state, the test moves the job
there with ``catalog.transition``, as the reconciler would (and marks a failure it
gives up on with ``catalog.failed_attempt``).

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures (moving ``Mesh``, ``one_error_line``
and ``fake_agent`` to tests/support would let it split by command).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from jobmesh import jobids
from jobmesh.agent.dump import dump
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.agent.store import Store, open_store
from jobmesh.controller.api.app import build_app
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.cli.client import Client, RequestFailed
from jobmesh.controller.mesh import MeshError, MeshInfo, ensure_secret, read_mesh, write_mesh
from jobmesh.router.credentials import parse_verifier
from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(90)


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Mesh:
    state_dir: Path
    cwd: Path
    catalog: Catalog
    store: Store
    agent_url: str  # a fake agent whose /dump is a real pg_dump

    async def run(self, *args: str, stdin: bytes | None = None,
                  env: dict[str, str] | None = None) -> Result:
        """``python -m jobmesh ARGS`` with JOBMESH_STATE_DIR pointing at this mesh."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jobmesh", *args, cwd=self.cwd,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "JOBMESH_STATE_DIR": str(self.state_dir), **(env or {})})
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


def one_error_line(r: Result, *fragments: str) -> str:
    """A failure: exit 1, nothing on stdout, one line on stderr, no traceback."""
    assert r.code == 1, r
    assert "Traceback" not in r.err, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def fake_agent(pg: Instance, store: Store) -> web.Application:
    """An agent's ``POST /dump``: a real pg_dump of ``pg``'s job_alpha into the store."""

    async def handle(_req: web.Request) -> web.Response:
        dsn = (f"postgresql://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{pg.port}/job_alpha")
        manifest = await dump(dsn, store, "alpha")
        return web.Response(body=manifest.to_json(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/dump", handle)
    return app


@pytest.fixture
async def mesh(catalog: Catalog, pg: Instance, tmp_path: Path) -> AsyncIterator[Mesh]:
    state, cwd = tmp_path / "state", tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "store").mkdir()
    store = open_store(f"file://{tmp_path / 'store'}")
    token = ensure_secret(state / "api-token")
    ensure_secret(state / "admin-password")
    runners = []
    try:
        runner, port = await _serve(build_app(catalog, token=token, store=store,
                                              state_dir=state, backend="local",
                                              enforced_limits=frozenset()))
        runners.append(runner)
        agent, agent_port = await _serve(fake_agent(pg, store))
        runners.append(agent)
        write_mesh(state, f"http://127.0.0.1:{port}", "127.0.0.1", 16432, "admin")
        yield Mesh(state, cwd, catalog, store, f"http://127.0.0.1:{agent_port}")
    finally:
        for r in runners:
            await r.cleanup()
        await store.close()


async def _not_given_up(catalog: Catalog, job_id: str) -> bool:
    job = await catalog.job(job_id)
    return job is not None and not job.gave_up


async def until_job(catalog: Catalog, job_id: str, desired: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (job := await catalog.job(job_id)) is None or job.desired_state != desired:
        if loop.time() > deadline:
            raise AssertionError(f"job {job_id} never wanted {desired}")
        await asyncio.sleep(0.02)


# --- finding the mesh --------------------------------------------------------------------------


def test_write_mesh_then_read_mesh(tmp_path: Path) -> None:
    token = ensure_secret(tmp_path / "api-token")
    password = ensure_secret(tmp_path / "admin-password")
    write_mesh(tmp_path, "http://127.0.0.1:6480/", "127.0.0.1", 6432, "admin")
    info = read_mesh(tmp_path)
    assert info == MeshInfo(tmp_path, "http://127.0.0.1:6480", "127.0.0.1", 6432, "admin",
                            token)
    assert info.admin_password() == password
    assert json.loads((tmp_path / "mesh.json").read_text())["router"] == {
        "host": "127.0.0.1", "port": 6432}


def test_ensure_secret_creates_a_private_secret_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "api-token"
    first = ensure_secret(path)
    assert len(first) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["api-token"]


def test_read_mesh_without_a_mesh_or_with_a_damaged_file(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match=f"no running mesh under {tmp_path}: start it with "
                                        "`jobmesh up`"):
        read_mesh(tmp_path)
    (tmp_path / "mesh.json").write_text("{")
    ensure_secret(tmp_path / "api-token")
    with pytest.raises(MeshError, match="damaged"):
        read_mesh(tmp_path)


async def test_no_running_mesh_is_one_line_naming_the_directory(mesh: Mesh,
                                                                tmp_path: Path) -> None:
    empty = tmp_path / "elsewhere"
    r = await mesh.run("job", "list", env={"JOBMESH_STATE_DIR": str(empty)})
    line = one_error_line(r, "jobmesh job list:", f"no running mesh under {empty}",
                          "`jobmesh up`")
    assert line.startswith("jobmesh job list: ")


async def test_state_dir_flag_beats_the_environment(mesh: Mesh, tmp_path: Path) -> None:
    r = await mesh.run("job", "list", "--state-dir", str(mesh.state_dir),
                       env={"JOBMESH_STATE_DIR": str(tmp_path / "nothing")})
    assert r.code == 0, r
    r = await mesh.run("status", "--state-dir", str(tmp_path / "nothing"))
    one_error_line(r, "no running mesh")


async def test_an_unreachable_api_is_one_line_with_a_hint(mesh: Mesh) -> None:
    write_mesh(mesh.state_dir, f"http://127.0.0.1:{free_port()}", "127.0.0.1", 16432, "admin")
    r = await mesh.run("status")
    one_error_line(r, "cannot reach the API", "hint:")


async def test_a_wrong_token_is_one_line_naming_the_token_file(mesh: Mesh) -> None:
    (mesh.state_dir / "api-token").write_text("not-the-token\n")
    r = await mesh.run("job", "list")
    line = one_error_line(r, "missing or wrong API token", "hint:",
                          f"refused the one in {mesh.state_dir}/api-token")
    assert "Authorization" not in line  # the API's words for an HTTP client


async def test_a_request_the_api_does_not_know_is_said_to_be_a_version_mismatch(
        mesh: Mesh) -> None:
    info = read_mesh(mesh.state_dir)
    with pytest.raises(RequestFailed) as exc:
        await asyncio.to_thread(Client(info.api, info.token).call, "GET", "/v1/nothing")
    assert str(exc.value) == (f"the API at {info.api} does not know this request (no endpoint "
                              "/v1/nothing) (hint: is the controller older than this CLI? "
                              "run the same jobmesh version for both)")


async def test_output_into_a_closed_pipe_is_no_traceback(mesh: Mesh) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jobmesh", "status", "-o", "json", stdout=write_end,
            stderr=asyncio.subprocess.PIPE, env={**os.environ,
                                                 "JOBMESH_STATE_DIR": str(mesh.state_dir)})
    finally:
        os.close(write_end)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (proc.returncode, err.decode()) == (141, "")


# --- jobs ---------------------------------------------------------------------------------------


async def test_job_create_no_wait_list_and_show(mesh: Mesh) -> None:
    r = await mesh.run("job", "create", "alpha", "--archive-timeout", "30", "--cpu", "500m",
                       "--no-wait")
    assert r.code == 0 and r.out.strip() == "job alpha: creating", r
    job = await mesh.catalog.job("alpha")
    assert job is not None and job.spec == {"archive_timeout": 30, "cpu": "500m"}
    r = await mesh.run("job", "list")
    assert r.code == 0
    header, row = r.out.strip().splitlines()
    assert header.split()[:3] == ["ID", "STATE", "DESIRED"]
    assert row.split()[:3] == ["alpha", "creating", "running"]
    r = await mesh.run("job", "show", "alpha")
    assert r.code == 0 and "creating (wanted running)" in r.out and "created" in r.out


async def test_job_create_waits_until_running(mesh: Mesh) -> None:
    cli = asyncio.create_task(mesh.run("job", "create", "alpha"))
    await until_job(mesh.catalog, "alpha", "running")
    await mesh.catalog.transition("alpha", "creating", "running", host="127.0.0.1", port=5999)
    r = await cli
    assert r.code == 0, r
    assert r.out.splitlines() == [
        "job alpha: running",
        'connect: psql "postgresql://admin:<password>@127.0.0.1:16432/job_alpha"',
        f"         <password>: the admin's, in {mesh.state_dir}/admin-password; "
        "or: jobmesh psql alpha"]
    assert r.err == ""  # nothing asked for that the backend ignores


async def test_job_show_has_the_same_connect_line(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    r = await mesh.run("job", "show", "alpha")
    assert r.code == 0, r
    assert ('  connect:     psql "postgresql://admin:<password>@127.0.0.1:16432/job_alpha"\n'
            f"               <password>: the admin's, in {mesh.state_dir}/admin-password; "
            "or: jobmesh psql alpha\n") in r.out


async def test_limits_the_local_backend_does_not_enforce_are_a_warning(mesh: Mesh) -> None:
    r = await mesh.run("job", "create", "alpha", "--memory", "1Gi", "--cpu", "2", "--no-wait")
    assert (r.code, r.out.strip()) == (0, "job alpha: creating"), r
    assert r.err.splitlines() == ["warning: the local backend does not enforce --memory and "
                                  "--cpu (the job runs without those limits)"]
    r = await mesh.run("job", "create", "beta", "--disk", "1Gi", "--no-wait")
    assert r.err.splitlines() == ["warning: the local backend does not enforce --disk (the "
                                  "job runs without that limit)"]
    r = await mesh.run("job", "show", "alpha")
    assert ("  warning:     the local backend does not enforce --memory and --cpu (the job "
            "runs without those limits)\n") in r.out


async def test_job_pause_waits_until_paused(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.transition("alpha", "creating", "running")
    cli = asyncio.create_task(mesh.run("job", "pause", "alpha"))
    await until_job(mesh.catalog, "alpha", "paused")
    await mesh.catalog.transition("alpha", "running", "pausing")
    await mesh.catalog.transition("alpha", "pausing", "paused")
    r = await cli
    assert (r.code, r.out.strip()) == (0, "job alpha: paused"), r


async def test_a_wait_that_runs_out_is_one_line_even_with_a_multiline_job_error(
        mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.failed_attempt("alpha", "creating", "initdb failed:\n  no space left")
    r = await mesh.run("job", "end", "alpha", "--timeout", "0.5")
    one_error_line(r, "still creating", "not yet ended", "initdb failed: no space left",
                   "hint:", "job show alpha")


async def test_job_show_tells_the_attempts_and_when_the_next_is_due(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.failed_attempt("alpha", "creating", "disk full",
                                      next_attempt_at=datetime.now(UTC) + timedelta(seconds=30))
    r = await mesh.run("job", "show", "alpha")
    assert r.code == 0, r
    assert "  error:       disk full\n" in r.out
    assert re.search(r"^  attempts:    1, next in (29|30) s$", r.out, re.M), r.out


async def test_job_show_tells_a_job_given_up_on_and_what_to_do(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                      gave_up=True)
    r = await mesh.run("job", "show", "alpha")
    assert r.code == 0, r
    assert ("  attempts:    1, gave up: it will not be retried (fix the cause, then "
            "`jobmesh job retry alpha`, or `jobmesh job delete alpha`)") in r.out
    r = await mesh.run("job", "list")
    assert "gave up: the dump does not load" in r.out


async def test_a_wait_for_a_job_given_up_on_is_one_line_at_once(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                      gave_up=True)
    started = time.monotonic()
    r = await mesh.run("job", "resume", "alpha")  # the default wait: 600 s
    assert time.monotonic() - started < 10
    one_error_line(r, "jobmesh job resume: job alpha: the dump does not load",
                   "it will not be retried", "`jobmesh job retry alpha`",
                   "`jobmesh job delete alpha`")


async def test_an_import_that_gives_up_is_one_line_within_seconds(mesh: Mesh,
                                                                   tmp_path: Path) -> None:
    src = tmp_path / "in.pgdump"
    src.write_bytes(b"PGDMP" + bytes(1000))
    cli = asyncio.create_task(mesh.run("job", "import", "beta", str(src)))
    await until(lambda: mesh.catalog.job("beta"), "the imported job's row")
    started = time.monotonic()
    await mesh.catalog.failed_attempt("beta", "creating", "cannot import beta.pgdump into "
                                      "job beta: could not read from input file: end of file",
                                      gave_up=True)
    r = await cli
    assert time.monotonic() - started < 10
    *upload, _ = r.err.strip().splitlines()
    assert all(line.startswith(f"importing {src}") for line in upload), r.err
    one_error_line(Result(r.code, r.out, r.err.strip().splitlines()[-1]),
                   "jobmesh job import: job beta: cannot import beta.pgdump",
                   "end of file", "`jobmesh job retry beta`")


async def test_job_retry_tries_again_and_waits(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                      gave_up=True)
    cli = asyncio.create_task(mesh.run("job", "retry", "alpha"))
    await until(lambda: _not_given_up(mesh.catalog, "alpha"), "the retry")
    await mesh.catalog.transition("alpha", "creating", "running")
    r = await cli
    assert (r.code, r.out.strip()) == (0, "job alpha: running"), r
    r = await mesh.run("job", "retry", "nope")
    one_error_line(r, "jobmesh job retry: no job nope")


async def test_job_delete_of_a_job_given_up_on(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                      gave_up=True)
    r = await mesh.run("job", "delete", "alpha", "--no-wait")
    assert r.code == 0 and "deletion requested" in r.out, r
    job = await mesh.catalog.job("alpha")
    assert job is not None and job.desired_state == "deleted" and not job.gave_up


async def test_resume_and_delete_without_waiting(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    r = await mesh.run("job", "resume", "alpha", "--no-wait")
    assert r.code == 0 and r.out.strip() == "job alpha: creating (wanted running)"
    r = await mesh.run("job", "delete", "alpha", "--no-wait")
    assert r.code == 0 and "deletion requested" in r.out
    assert (await mesh.catalog.job("alpha")).desired_state == "deleted"  # type: ignore[union-attr]


async def test_an_unknown_job_is_one_line_with_the_api_hint(mesh: Mesh) -> None:
    r = await mesh.run("job", "show", "nope")
    one_error_line(r, "jobmesh job show: no job nope", "hint:", "jobmesh job list")


async def test_a_bad_job_id_is_one_line(mesh: Mesh) -> None:
    r = await mesh.run("job", "create", "Bad_ID", "--no-wait")
    one_error_line(r, "jobmesh job create: bad job id")
    r = await mesh.run("job", "create", "alpha", "--memory", "lots", "--no-wait")
    one_error_line(r, "memory must be a Kubernetes quantity")
    r = await mesh.run("job", "show", "alpha/events")  # never another endpoint
    one_error_line(r, "jobmesh job show: bad job id 'alpha/events'")


async def test_usage_errors_exit_2(mesh: Mesh) -> None:
    r = await mesh.run("grant", "ann", "scrape-*")
    assert r.code == 2 and "--read" in r.err and "Traceback" not in r.err
    r = await mesh.run("job", "frobnicate", "alpha")
    assert r.code == 2 and "Traceback" not in r.err


async def test_export_downloads_a_verified_dump_to_id_pgdump(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.transition("alpha", "creating", "running",
                                  agent_url=mesh.agent_url)
    r = await mesh.run("job", "export", "alpha")
    assert r.code == 0, r
    out = mesh.cwd / "alpha.pgdump"
    data = out.read_bytes()
    assert data.startswith(b"PGDMP")
    assert f"sha256 {hashlib.sha256(data).hexdigest()[:16]}" in r.out
    assert "exporting job alpha" in r.err  # the progress bar's line when not on a terminal
    assert list(mesh.cwd.iterdir()) == [out]  # the .partial was renamed


async def test_export_to_a_named_file_and_a_failed_export_leaves_nothing(mesh: Mesh) -> None:
    r = await mesh.run("job", "export", "nope", "-o", "x.pgdump")
    one_error_line(r, "no job nope")
    assert list(mesh.cwd.iterdir()) == []


async def test_import_uploads_the_file_and_creates_the_job(mesh: Mesh, tmp_path: Path) -> None:
    src = tmp_path / "in.pgdump"
    src.write_bytes(b"PGDMP" + os.urandom(2 << 20))
    r = await mesh.run("job", "import", "beta", str(src), "--no-wait")
    assert r.code == 0, r
    assert r.out.strip().startswith("job beta: creating (imported 2.1 MB)")
    stored = mesh.state_dir / "imports" / "beta.pgdump"
    assert stored.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644
    job = await mesh.catalog.job("beta")
    assert job is not None and job.spec == {"source": {"dump": str(stored.absolute())}}


async def test_import_of_a_file_that_is_not_a_dump_fails_before_uploading(
        mesh: Mesh, tmp_path: Path) -> None:
    src = tmp_path / "in.sql"
    src.write_text("SELECT 1;\n")
    r = await mesh.run("job", "import", "beta", str(src))
    one_error_line(r, "not a pg_dump custom-format archive")
    r = await mesh.run("job", "import", "beta", str(tmp_path / "missing"))
    one_error_line(r, "cannot read", "No such file")
    assert await mesh.catalog.job("beta") is None


async def test_import_over_an_existing_job_is_one_line(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.catalog.create_job("beta")
    src = tmp_path / "in.pgdump"
    src.write_bytes(b"PGDMP" + bytes(1000))
    r = await mesh.run("job", "import", "beta", str(src))
    one_error_line(r, "job beta already exists")


# --- users and grants ---------------------------------------------------------------------------


async def test_user_create_shows_a_generated_password_once_and_it_verifies(mesh: Mesh) -> None:
    r = await mesh.run("user", "create", "ann")
    assert r.code == 0, r
    password = r.out.split("password (shown once): ")[1].strip()
    [row] = await mesh.catalog.principals("ann")
    assert parse_verifier(row.verifier).matches(password)


async def test_user_create_with_password_stdin(mesh: Mesh) -> None:
    r = await mesh.run("user", "create", "ann", "--password-stdin", stdin=b"hunter2\n")
    assert r.code == 0 and "hunter2" not in r.out, r
    [row] = await mesh.catalog.principals("ann")
    assert parse_verifier(row.verifier).matches("hunter2")
    r = await mesh.run("user", "create", "bob", "--password-stdin", stdin=b"")
    one_error_line(r, "no password on stdin")


async def test_users_grants_and_revokes(mesh: Mesh) -> None:
    await mesh.run("user", "create", "ann")
    r = await mesh.run("grant", "ann", "scrape-*", "--read")
    assert (r.code, r.out.strip()) == (0, "granted ann read access to scrape-*"), r
    r = await mesh.run("user", "list")
    assert r.code == 0
    assert r.out.splitlines()[1].split() == ["ann", "scrape-*:read"]
    r = await mesh.run("revoke", "ann", "scrape-*")
    assert r.code == 0, r
    assert (await mesh.catalog.principals("ann"))[0].grants == ()
    r = await mesh.run("revoke", "ann", "scrape-*")
    one_error_line(r, "jobmesh revoke: user ann has no grant")
    r = await mesh.run("grant", "nobody", "*", "--write")
    one_error_line(r, "no user nobody")
    r = await mesh.run("user", "delete", "ann")
    assert (r.code, r.out.strip()) == (0, "deleted user ann")
    r = await mesh.run("user", "delete", "ann")
    one_error_line(r, "jobmesh user delete: no user ann", "hint:")


# --- the mesh -----------------------------------------------------------------------------------


async def test_status_shows_jobs_by_state_and_the_router(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    r = await mesh.run("status")
    assert r.code == 0, r
    assert "router:  127.0.0.1:16432" in r.out
    assert "creating   1" in r.out and "alpha: creating -> running" in r.out


async def test_psql_runs_psql_through_the_router_as_the_admin(mesh: Mesh,
                                                              tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "psql"
    fake.write_text('#!/bin/sh\necho "$PGHOST $PGPORT $PGUSER $PGDATABASE $PGPASSWORD $*"\n')
    fake.chmod(0o755)
    r = await mesh.run("psql", "alpha", "-c", "select 1",
                       env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert r.code == 0, r
    password = (mesh.state_dir / "admin-password").read_text().strip()
    assert r.out.strip() == f"127.0.0.1 16432 admin job_alpha {password} -c select 1"


async def test_psql_as_another_user_leaves_the_password_to_psql(mesh: Mesh, tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "psql"
    fake.write_text('#!/bin/sh\necho "$PGUSER $PGDATABASE ${PGPASSWORD-unset} $*"\n')
    fake.chmod(0o755)
    path = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for args in (["psql", "alpha", "--user", "ann", "-c", "select 1"],
                 ["psql", "--user", "ann", "alpha", "-c", "select 1"],
                 ["psql", "alpha", "--user=ann", "-c", "select 1"]):
        r = await mesh.run(*args, env=path)
        assert (r.code, r.out.strip()) == (0, "ann job_alpha unset -c select 1"), (args, r)
    r = await mesh.run("psql", "alpha", "-c", "select 1", "--user", "x", env=path)
    password = (mesh.state_dir / "admin-password").read_text().strip()
    assert r.out.strip() == f"admin job_alpha {password} -c select 1 --user x"  # psql's own
    r = await mesh.run("psql", "alpha", "--user", env=path)
    assert r.code == 2 and "--user" in r.err and "Traceback" not in r.err


# --- one rule for job ids ---------------------------------------------------------------------


@pytest.mark.parametrize("job_id, why", [("Scrape-42", "ids are lowercase"),
                                         ("x" * 60, "it is 60 characters long"),
                                         ("a.b", "it contains '.'")])
async def test_a_bad_job_id_is_the_rule_in_one_line_before_any_request(
        mesh: Mesh, tmp_path: Path, job_id: str, why: str) -> None:
    write_mesh(mesh.state_dir, f"http://127.0.0.1:{free_port()}", "127.0.0.1", 16432, "admin")
    dump_file = tmp_path / "in.pgdump"
    dump_file.write_bytes(b"PGDMP" + bytes(100))
    for args in (["job", "create", job_id], ["job", "show", job_id],
                 ["job", "pause", job_id], ["job", "delete", job_id],
                 ["job", "export", job_id], ["job", "import", job_id, str(dump_file)],
                 ["psql", job_id]):
        r = await mesh.run(*args)
        line = one_error_line(r, f": bad job id {job_id!r}: {why}; {jobids.RULE}")
        assert line.count("1-59") == 1 and "'id'" not in line and "{" not in line, line
    assert list(mesh.cwd.iterdir()) == []


# --- passwords -----------------------------------------------------------------------------------


async def test_user_passwd_shows_a_new_password_once_and_only_it_verifies(mesh: Mesh) -> None:
    await mesh.run("user", "create", "ann", "--password-stdin", stdin=b"old-one\n")
    r = await mesh.run("user", "passwd", "ann")
    assert r.code == 0, r
    first, second = r.out.splitlines()
    assert first == "changed the password of user ann"
    password = second.removeprefix("password (shown once): ")
    assert password != second and len(password) >= 16
    [row] = await mesh.catalog.principals("ann")
    verifier = parse_verifier(row.verifier)
    assert verifier.matches(password) and not verifier.matches("old-one")


async def test_user_passwd_with_password_stdin(mesh: Mesh) -> None:
    await mesh.run("user", "create", "ann")
    r = await mesh.run("user", "passwd", "ann", "--password-stdin", stdin=b"hunter2\n")
    assert (r.code, r.out.strip()) == (0, "changed the password of user ann"), r
    [row] = await mesh.catalog.principals("ann")
    assert parse_verifier(row.verifier).matches("hunter2")
    r = await mesh.run("user", "passwd", "ann", "--password-stdin", stdin=b"")
    one_error_line(r, "jobmesh user passwd: no password on stdin")


async def test_user_passwd_of_the_admin_says_where_its_password_is(mesh: Mesh) -> None:
    r = await mesh.run("user", "passwd", "admin")
    one_error_line(r, "jobmesh user passwd: the admin's password is the file "
                      f"{mesh.state_dir}/admin-password", "remove that file",
                   "start `jobmesh up` again")


async def test_user_passwd_of_an_unknown_user_is_one_line(mesh: Mesh) -> None:
    r = await mesh.run("user", "passwd", "nobody")
    line = one_error_line(r, "jobmesh user passwd: no user nobody", "jobmesh user list")
    assert "/v1/" not in line


# --- output formats ------------------------------------------------------------------------------


async def test_o_json_and_o_yaml_are_the_same_answer_as_json(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha", {"memory": "1Gi"})
    await mesh.run("user", "create", "ann")
    for command in (["job", "list"], ["job", "show", "alpha"], ["user", "list"], ["status"]):
        legacy = await mesh.run(*command, "--json")
        as_json = await mesh.run(*command, "-o", "json")
        as_yaml = await mesh.run(*command, "-o", "yaml")
        assert legacy.code == as_json.code == as_yaml.code == 0, (legacy, as_json, as_yaml)
        body = json.loads(legacy.out)
        assert json.loads(as_json.out) == body and body
        assert yaml.safe_load(as_yaml.out) == body, as_yaml.out
    assert json.loads((await mesh.run("job", "show", "alpha", "-o", "json")).out)[
        "warnings"][0]["fields"] == ["memory"]


async def test_job_list_o_wide_has_more_columns(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha", {"cpu": "2"})
    r = await mesh.run("job", "list", "-o", "wide")
    assert r.code == 0, r
    header, row = r.out.splitlines()
    assert header.split() == ["ID", "STATE", "DESIRED", "ADDRESS", "LAST", "ACTIVE",
                              "ATTEMPTS", "CREATED", "AGENT", "SPEC", "ERROR"]
    assert '{"cpu": "2"}' in row


async def test_a_bad_output_format_is_a_usage_error(mesh: Mesh) -> None:
    for command in (["job", "list"], ["job", "show", "alpha"], ["user", "list"], ["status"]):
        r = await mesh.run(*command, "-o", "xml")
        assert r.code == 2 and "invalid choice: 'xml'" in r.err, r
        assert "Traceback" not in r.err


# --- export and import paths ---------------------------------------------------------------------


async def _running_with_agent(mesh: Mesh) -> None:
    await mesh.catalog.create_job("alpha")
    await mesh.catalog.transition("alpha", "creating", "running", agent_url=mesh.agent_url)


async def test_export_into_a_directory_and_over_a_file_only_with_force(mesh: Mesh,
                                                                       tmp_path: Path) -> None:
    await _running_with_agent(mesh)
    out_dir = tmp_path / "dumps"
    out_dir.mkdir()
    r = await mesh.run("job", "export", "alpha", "-o", f"{out_dir}/")
    assert r.code == 0, r
    out = out_dir / "alpha.pgdump"
    assert out.read_bytes().startswith(b"PGDMP") and f"to {out} " in r.out
    out.write_bytes(b"mine")
    r = await mesh.run("job", "export", "alpha", "-o", str(out_dir))  # a directory: no '/'
    one_error_line(r, f"jobmesh job export: {out} exists", "--force")
    assert out.read_bytes() == b"mine"
    r = await mesh.run("job", "export", "alpha", "-o", str(out), "--force")
    assert r.code == 0, r
    assert out.read_bytes().startswith(b"PGDMP")
    assert list(out_dir.iterdir()) == [out]  # no .partial left


@pytest.mark.parametrize("output, fragments", [
    ("/", ["no job nope"]),
    ("", ["-o names no file", "-o DIR/"]),
    ("/nonexistent/dir/f", ["cannot write /nonexistent/dir/f",
                            "there is no directory /nonexistent/dir"]),
    ("{tmp}/missing/", ["cannot write {tmp}/missing/", "there is no directory {tmp}/missing"]),
    ("{tmp}/a-file/f", ["cannot write {tmp}/a-file/f", "{tmp}/a-file is not a directory"]),
])
async def test_export_to_odd_paths_is_one_line_without_python_words(
        mesh: Mesh, tmp_path: Path, output: str, fragments: list[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    r = await mesh.run("job", "export", "nope", "-o", output.format(tmp=tmp_path))
    line = one_error_line(r, *(f.format(tmp=tmp_path) for f in fragments))
    assert "Path(" not in line and "Errno" not in line, line
    assert _left_behind(tmp_path) == []


def _left_behind(tmp_path: Path) -> list[Path]:
    """What a failed export left: a .partial in / (for -o /), anything new in tmp_path."""
    made = {"a-file", "cwd", "state", "store"}
    return [*Path("/").glob(".nope.pgdump.*.partial"),
            *(p for p in tmp_path.iterdir() if p.name not in made)]


def _unreadable(tmp_path: Path) -> Path:
    """A file that cannot be opened for reading, even by root (who ignores mode 000)."""
    path = tmp_path / "locked.pgdump"
    path.write_bytes(b"PGDMP")
    path.chmod(0)
    if not os.access(path, os.R_OK):
        return path
    sysctl = Path("/proc/sys/vm/compact_memory")  # write-only, for root too
    if sysctl.exists() and not os.access(sysctl, os.R_OK):
        return sysctl
    pytest.skip("no file here that root cannot read")


async def test_import_of_odd_files_is_one_line_without_python_words(mesh: Mesh,
                                                                     tmp_path: Path) -> None:
    cases = [(str(tmp_path), "Is a directory"),
             (str(tmp_path / "missing"), "No such file or directory"),
             (str(_unreadable(tmp_path)), "Permission denied"),
             ("/proc/self/mem", "Input/output error"),  # opens, then the read fails
             ("/dev/null", "not a regular file"),
             ("", "no file to import")]
    for path, fragment in cases:
        r = await mesh.run("job", "import", "beta", path)
        line = one_error_line(r, "jobmesh job import: ", fragment)
        assert "Path(" not in line and "Errno" not in line, line
    assert await mesh.catalog.job("beta") is None


async def test_every_operator_action_is_an_event_naming_who_and_from_where(mesh: Mesh) -> None:
    """Audit: users, grants and a job's wants through the CLI (the API's token) are events
    with their actor and source, which `jobmesh events` reads."""
    steps = [("user", "create", "analyst"), ("grant", "analyst", "scrape-*", "--read"),
             ("revoke", "analyst", "scrape-*"), ("job", "create", "alpha", "--no-wait"),
             ("job", "end", "alpha", "--no-wait"), ("user", "delete", "analyst")]
    for step in steps:
        r = await mesh.run(*step)
        assert r.code == 0, (step, r)
    events = [e for e in await mesh.catalog.events() if e.actor is not None]
    assert [(e.job_id, e.kind) for e in events] == [
        (None, "user-created"), (None, "granted"), (None, "revoked"), ("alpha", "created"),
        ("alpha", "desired"), (None, "user-deleted")]
    assert {e.actor for e in events} == {"api"}
    assert events[1].detail == {"user": "analyst", "pattern": "scrape-*", "access": "read",
                                "source": "127.0.0.1"}
    assert events[4].detail == {"desired_state": "ended"}
    r = await mesh.run("events")
    assert r.code == 0, r
    header, *rows = r.out.strip().splitlines()
    assert header.split() == ["AT", "JOB", "KIND", "ACTOR", "WHAT"]
    kinds = [row.split()[3] for row in rows]
    assert kinds[:1] == ["user-created"] and "granted" in kinds and "user-deleted" in kinds
    r = await mesh.run("events", "--job", "alpha", "-o", "json")
    assert r.code == 0 and {e["job_id"] for e in json.loads(r.out)["events"]} == {"alpha"}
    r = await mesh.run("events", "--job", "nope")
    assert r.code == 1 and r.err.count("\n") == 1 and "no job nope" in r.err, r
