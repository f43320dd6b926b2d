"""An attacker beside the mesh: real processes on loopback, each attack a test, each
showing that the attack gets nowhere and that the job keeps serving.

The attacker is this test process: a local process (on one machine, every local
process can reach the agents' loopback ports; on Kubernetes, whatever the
NetworkPolicy lets through).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import pytest

from jobmesh.agent.apitoken import header, job_token
from tests.support.kube_mesh import KubeMesh
from tests.support.mesh import Mesh, psql

pytestmark = pytest.mark.timeout(300)
PW = "pw-of-the-owner"


@dataclass
class Deployed:
    mesh: Mesh
    backend: str


@pytest.fixture(params=["local", "kubernetes"])
def deployed(request: pytest.FixtureRequest) -> Deployed:
    if request.param == "local":
        mesh: Mesh = request.getfixturevalue("mesh")
        mesh.start_controller("--idle-timeout", "0")
    else:
        k: KubeMesh = request.getfixturevalue("kube")
        k.start_controller()
        mesh = k.mesh
    mesh.start_router()
    return Deployed(mesh, request.param)


async def two_jobs(mesh: Mesh) -> None:
    await mesh.add_user("owner", PW, star="write")
    for job in ("alpha", "beta"):
        await mesh.create_job(job)


async def call(method: str, url: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as http, http.request(method, url,
                                                             headers=headers) as resp:
        return resp.status


async def test_without_its_token_no_one_can_pause_back_up_or_dump_a_job(
        deployed: Deployed) -> None:
    mesh = deployed.mesh
    await two_jobs(mesh)
    job = await mesh.catalog.job("alpha")
    assert job is not None and job.agent_url
    psql(mesh.dsn("alpha", "owner", PW), "CREATE TABLE t AS SELECT 1 AS x")
    forged = {"Authorization": "Bearer " + "A" * 43}
    beta_s = mesh.agent_headers("beta")  # another job's own token
    other_key = header(job_token(b"not the controller's key", "alpha"))
    for method, path in (("POST", "/pause"), ("POST", "/base-backup"), ("POST", "/dump"),
                         ("GET", "/status")):
        for headers in (None, forged, beta_s, other_key, {"Authorization": "Basic eDp4"}):
            assert await call(method, job.agent_url + path, headers) == 401, (path, headers)
    assert await call("GET", job.agent_url + "/healthz") == 200  # probes stay open
    # the job was never touched: it serves, and nothing was paused or snapshotted
    assert psql(mesh.dsn("alpha", "owner", PW), "SELECT x FROM t") == "1"
    job = await mesh.catalog.job("alpha")
    assert job is not None and job.state == "running"
    assert [s for s in await mesh.catalog.snapshots("alpha") if s["kind"] == "pause"] == []
    # what the controller sends works (the job's own token)
    assert await call("GET", job.agent_url + "/status", mesh.agent_headers("alpha")) == 200


async def test_the_local_agent_hosts_own_endpoints_want_the_hosts_token(mesh: Mesh) -> None:
    """On one machine one agent host runs every job's agent; starting or stopping one
    (or listing them) is the controller's alone."""
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("owner", PW, star="write")
    await mesh.create_job("alpha")
    job = await mesh.catalog.job("alpha")
    assert job is not None and job.agent_url
    host = job.agent_url.rsplit("/jobs/", 1)[0]
    job_s = mesh.agent_headers("alpha")  # a job's token is not the host's
    for method, path in (("GET", "/jobs"), ("DELETE", "/jobs/alpha"), ("PUT", "/jobs/evil")):
        for headers in (None, job_s):
            assert await call(method, host + path, headers) == 401, (method, path)
    assert psql(mesh.dsn("alpha", "owner", PW), "SELECT 1") == "1"
    assert await call("GET", job.agent_url + "/status", job_s) == 200  # its agent still runs
    log = (mesh.root / "agent-host.log").read_text()
    assert "refused DELETE /jobs/alpha from 127.0.0.1: missing or wrong agent token" in log
