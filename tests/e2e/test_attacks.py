"""An attacker beside the mesh: real processes on loopback, each attack a test, each
showing that the attack gets nowhere and that the job keeps serving.

The attacker is this test process: a local process (on one machine, every local
process can reach the agents' loopback ports; on Kubernetes, whatever the
NetworkPolicy lets through).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import psycopg
import pytest
from botocore.exceptions import ClientError

from jobmesh.agent.apitoken import header, job_token
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.passwords import scram_verifier
from tests.support.kube_mesh import NS, KubeMesh, running_kube_mesh
from tests.support.mesh import Mesh, psql, router_dsn
from tests.support.s3 import S3Server

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


@pytest.mark.parametrize("sql", [
    "UPDATE principals SET admin = true",
    "INSERT INTO grants (principal, pattern, access) VALUES ('owner', '*', 'write')",
    "DELETE FROM jobs",
    "UPDATE jobs SET desired_state = 'deleted'",
    "DELETE FROM snapshots",
    "SELECT * FROM web_sessions",
    "SELECT * FROM events",
    "CREATE TABLE mine (x int)",
    "SELECT jobmesh_router_report('r', 'x', '{}', '{}', 0)",
])
async def test_the_routers_catalog_login_cannot_rewrite_the_catalog(catalog: Catalog,
                                                                    catalog_dsn: str,
                                                                    sql: str) -> None:
    """A router is the component exposed to the internet: with its catalog credentials
    one reads routes and can wake or pause a job, nothing more."""
    await catalog.create_principal("owner", scram_verifier(PW))
    await catalog.create_job("alpha")
    conn = await asyncpg.connect(router_dsn(catalog_dsn))
    try:
        if sql.startswith("SELECT jobmesh_router_report"):  # allowed: what routers do
            await conn.execute(sql)
            return
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
    finally:
        await conn.close()
    assert [p.admin for p in await catalog.principals("owner")] == [False]
    assert [g for p in await catalog.principals() for g in p.grants] == []
    assert await catalog.job("alpha") is not None


async def test_what_a_router_may_do_it_does_through_narrow_functions(
        catalog: Catalog, catalog_dsn: str) -> None:
    await catalog.create_job("alpha")
    await catalog.transition("alpha", "creating", "running")
    conn = await asyncpg.connect(router_dsn(catalog_dsn))
    try:
        rows = await conn.fetch("SELECT id, desired_state FROM jobmesh_request_pause($1, $2)",
                                "alpha", "ops")
        assert [tuple(r) for r in rows] == [("alpha", "paused")]
        rows = await conn.fetch("SELECT id, desired_state FROM jobmesh_request_wake($1)",
                                "alpha")
        assert [tuple(r) for r in rows] == [("alpha", "running")]
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 1  # routes: readable
    finally:
        await conn.close()
    kinds = [(e.kind, e.actor) for e in await catalog.events("alpha")]
    assert ("desired", "ops") in kinds and ("wake-requested", None) in kinds


async def test_the_stats_role_reads_no_secret(catalog: Catalog, catalog_dsn: str) -> None:
    await catalog.pool.execute("ALTER ROLE jobmesh_stats LOGIN PASSWORD 'stats-pw'")
    await catalog.create_job("alpha")
    parts = urlsplit(catalog_dsn)
    conn = await asyncpg.connect(urlunsplit(parts._replace(
        netloc=f"jobmesh_stats:stats-pw@{parts.hostname}:{parts.port}")))
    try:
        assert await conn.fetchval("SELECT state FROM jobs WHERE id = 'alpha'") == "creating"
        assert await conn.fetchval("SELECT count(*) FROM events") >= 1
        for sql in ("SELECT backend_password FROM jobs", "SELECT * FROM jobs",
                    "SELECT verifier FROM principals", "UPDATE jobs SET error = 'x'"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()


async def test_a_jobs_sql_cannot_reach_another_jobs_postgresql(mesh: Mesh) -> None:
    """On one machine every job's PostgreSQL runs as the same OS user, beside the others:
    a job owner's SQL (dblink and postgres_fdw are installed; COPY TO PROGRAM is not
    granted) must not get into another job's server, by socket or by TCP."""
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("owner", PW, alpha="write")  # alpha's owner; no grant on beta
    for job in ("alpha", "beta"):
        await mesh.create_job(job)
    beta = await mesh.catalog.job("beta")
    assert beta is not None and beta.port
    await mesh.add_user("peeker", PW, beta="read")
    socket_dir = mesh.root / "jobs" / "beta" / "run"
    assert any(p.name.startswith(".s.PGSQL.") for p in socket_dir.iterdir())
    alpha = mesh.dsn("alpha", "owner", PW)
    attempts = {
        "the socket, as the superuser": f"host={socket_dir} port={beta.port} user=postgres "
                                        "dbname=job_beta",
        "the socket, as beta's owner": f"host={socket_dir} port={beta.port} user=job_owner "
                                       "dbname=job_beta",
        "TCP, as the superuser": f"host=127.0.0.1 port={beta.port} user=postgres "
                                 "dbname=job_beta",
        "TCP, guessing a password": f"host=127.0.0.1 port={beta.port} user=job_owner "
                                    "password=guess dbname=job_beta",
    }
    for what, conninfo in attempts.items():
        with pytest.raises(psycopg.Error) as err, \
                psycopg.connect(alpha, autocommit=True) as conn:
            conn.execute("SELECT dblink_connect(%s)", (conninfo,))
        assert ("password is required" in str(err.value)
                or "password authentication failed" in str(err.value)), (what, err.value)
    with pytest.raises(psycopg.Error) as err, psycopg.connect(alpha, autocommit=True) as conn:
        conn.execute("CREATE SERVER b FOREIGN DATA WRAPPER postgres_fdw OPTIONS "
                     f"(host '{socket_dir}', port '{beta.port}', dbname 'job_beta')")
        conn.execute("CREATE USER MAPPING FOR CURRENT_USER SERVER b OPTIONS (user 'postgres')")
        conn.execute("CREATE FOREIGN TABLE f (x int) SERVER b OPTIONS (table_name 'pg_class')")
        conn.execute("SELECT * FROM f")
    assert "password is required" in str(err.value), err.value
    with pytest.raises(psycopg.errors.InsufficientPrivilege), \
            psycopg.connect(alpha, autocommit=True) as conn:
        conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
    # through the router, with a grant, is the way: and it works
    assert psql(mesh.dsn("beta", "peeker", PW), "SELECT 1") == "1"


# --- the store: a sidecar's credentials ---------------------------------------------


@dataclass
class Scoped:
    """A mesh whose controller issues scoped store credentials, on moto with IAM enforced."""

    mesh: Mesh
    s3: S3Server
    bucket: str
    backend: str
    kube: KubeMesh | None = None

    def sidecar_key(self, job_id: str) -> tuple[str, str]:
        """What an attacker in control of the job's agent holds: on Kubernetes, the job's
        Secret; on one machine, the agent host's environment."""
        if self.kube is not None:
            secret = self.kube.emulator.get("secrets", NS, f"job-{job_id}")
            assert secret is not None
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        else:
            pid = json.loads((self.mesh.root / "agent-host.json").read_text())["pid"]
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            data = dict(e.decode().partition("=")[::2] for e in raw if b"=" in e)
        return data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"]

    def keys(self, prefix: str) -> list[str]:
        listed = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture(params=["local", "kubernetes"])
async def scoped(request: pytest.FixtureRequest, iam_s3_server: S3Server, mesh: Mesh,
                 pg_root: Path, catalog_dsn: str, catalog: Catalog) -> AsyncIterator[Scoped]:
    s3 = iam_s3_server
    flags = ["--store-credentials", "scoped", "--iam-endpoint", s3.endpoint]
    if request.param == "local":
        bucket = s3.create_bucket(f"scoped-{os.urandom(4).hex()}")
        mesh.controller_env = s3.env  # the controller's own key: the only one that deletes
        mesh.start_controller("--idle-timeout", "0", "--store", f"s3://{bucket}/jobs",
                              "--s3-endpoint", s3.endpoint, *flags)
        mesh.start_router()
        yield Scoped(mesh, s3, bucket, "local")
        return
    async with running_kube_mesh(pg_root, catalog_dsn, catalog, s3) as k:
        k.mesh.controller_env = s3.env
        k.replicas.append(k.mesh.start_controller(*k.controller_args("one"), *flags))
        k.mesh.start_router()
        yield Scoped(k.mesh, s3, k.store.removeprefix("s3://").split("/")[0], "kubernetes", k)


async def test_a_sidecars_store_key_cannot_delete_or_reach_another_job(scoped: Scoped) -> None:
    """The job pauses to the store and resumes from it under the sidecar's key; that key
    (what an attacker in the sidecar holds) deletes nothing, cannot rewrite the store's
    key file, and on Kubernetes cannot read or write another job's prefix."""
    mesh = scoped.mesh
    await two_jobs(mesh)
    alpha = mesh.dsn("alpha", "owner", PW)
    psql(alpha, "CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    await mesh.pause("alpha")
    assert psql(alpha, "SELECT count(*) FROM t") == "1000"  # woken, restored from the store

    s3 = scoped.s3.client(key=scoped.sidecar_key("alpha"))
    prefix = "jobs/"  # (both meshes: s3://BUCKET/jobs)
    own = [k for k in scoped.keys(f"{prefix}alpha/") if "/snapshots/" in k]
    beta = scoped.keys(f"{prefix}beta/")
    shared = scoped.keys(f"{prefix}_objects/")
    assert own and beta and shared
    for doomed in (own[0], beta[0], shared[0]):
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.delete_object(Bucket=scoped.bucket, Key=doomed)
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.put_object(Bucket=scoped.bucket, Key=f"{prefix}_store/keys/evil.json", Body=b"{}")
    if scoped.backend == "kubernetes":  # a key per job: nothing of another's
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.get_object(Bucket=scoped.bucket, Key=beta[0])
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.put_object(Bucket=scoped.bucket, Key=f"{prefix}beta/snapshots/evil.json",
                          Body=b"{}")
    # the key is a working one (its own prefix), and nothing was lost
    s3.put_object(Bucket=scoped.bucket, Key=f"{prefix}alpha/probe", Body=b"")
    assert set(own + beta + shared) <= set(scoped.keys(prefix))
    assert psql(alpha, "SELECT count(*) FROM t") == "1000"

    if scoped.kube is not None:  # a deleted job's user goes with it
        iam = scoped.s3.client("iam")
        assert iam.get_user(UserName="jm-beta")
        await mesh.catalog.set_desired("beta", "deleted")

        async def gone() -> bool:
            return await mesh.catalog.job("beta") is None
        await mesh.wait_until("beta", gone, "beta deleted")
        with pytest.raises(ClientError, match="NoSuchEntity"):
            iam.get_user(UserName="jm-beta")
