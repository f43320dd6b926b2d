"""The Kubernetes backend end to end: ``jobmesh controller --backend kubernetes`` against the
API emulator (strict: every object the controller sends must validate), with the test
kubelet running each job pod's init step, PostgreSQL and agent as real processes, a real
router in front, a real catalog behind, and an S3 store (moto), as on a cluster. (A
``file://`` store would not do here: the test kubelet runs the agent as root, whose 0640
store files Postgres's ``wal-fetch`` could then not read; in a real pod both are uid 999.)"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest
from kubernetes import client

from jobmesh.agent.store import open_store
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import JOBS_CHANNEL, Event, Job
from jobmesh.router.credentials import parse_verifier
from tests.support.k8s_emulator import K8sEmulator
from tests.support.kube_mesh import LEASE, NS, KubeMesh
from tests.support.mesh import psql

pytestmark = pytest.mark.timeout(300)
PW = "pw-123"
def secret_data(k: KubeMesh, job_id: str) -> dict[str, str]:
    secret = k.emulator.get("secrets", NS, f"job-{job_id}")
    assert secret is not None
    return {key: base64.b64decode(v).decode() for key, v in secret["data"].items()}


async def until_job(k: KubeMesh, job_id: str, done: Callable[[Job | None, list[Event]], bool],
                timeout: float = 120) -> Job | None:
    """Wait (on NOTIFY) until ``done(job row, its transition events)``."""
    catalog = k.mesh.catalog
    changed = asyncio.Event()
    conn = await catalog.listen({JOBS_CHANNEL: lambda p: p == job_id and changed.set()})
    try:
        async with asyncio.timeout(timeout):
            while True:
                changed.clear()
                job = await catalog.job(job_id)
                if done(job, await catalog.events(job_id, kind="transition")):
                    return job
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"job {job_id}: {await catalog.job(job_id)}") from None
    finally:
        await conn.close()


def recovered(job: Job | None, events: list[Event]) -> bool:
    """Failed, then recovered and running again."""
    return job is not None and job.state == "running" and any(
        e.to_state == "failed" for e in events) and events[-1].from_state == "recovering"


async def wait_until_archived(agent_url: str, dsn: str, headers: dict[str, str],
                              timeout: float = 60) -> None:
    """Until the agent has shipped the WAL written so far: a write after the look at the
    last archived segment makes one more segment finish (the jobs here have
    archive_timeout 1; an idle server finishes none, and the segment of the test's own
    last write may have been archived before the look), and then the spool is empty."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        async with http.get(f"{agent_url}/status", headers=headers) as resp:
            before = (await resp.json())["wal"]["last_archived"]
        await asyncio.to_thread(psql, dsn, "CREATE TABLE IF NOT EXISTS archived_mark (at "
                                "timestamptz); INSERT INTO archived_mark VALUES (now())")
        while True:
            async with http.get(f"{agent_url}/status", headers=headers) as resp:
                wal = (await resp.json())["wal"]
            if wal["last_archived"] != before and wal["spool_backlog"] == 0:
                return
            await asyncio.sleep(0.1)


async def test_a_job_pod_has_the_specs_resources_and_is_reached_at_its_ip(
        kube: KubeMesh) -> None:
    """(Create, write, pause and wake are tested on both backends in test_mesh_e2e.)"""
    kube.start_controller()
    kube.mesh.start_router()
    job = await kube.mesh.create_job("alpha", cpu="500m", memory="256Mi", disk="1Gi")
    pod = kube.pod("alpha")
    assert pod is not None and job.host == pod["status"]["podIP"] and job.port == 5432
    assert job.agent_url == f"http://{job.host}:8008"
    [postgres] = [c for c in pod["spec"]["containers"] if c["name"] == "postgres"]
    assert postgres["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
    assert kube.emulator.get("configmaps", NS, "job-alpha") is not None
    assert kube.emulator.get("networkpolicies", NS, "jobmesh-jobs") is not None
    kube.assert_clean()


async def test_the_jobs_secret_holds_a_url_that_works_through_the_router(
        kube: KubeMesh) -> None:
    kube.start_controller()
    kube.mesh.start_router()
    job = await kube.mesh.create_job("beta")
    data = secret_data(kube, "beta")
    assert data["backend-password"] == job.backend_password
    url = urlsplit(data["url"])
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", 6432, "/job_beta")
    assert unquote(url.username or "") == "job-beta"
    # The router of this test listens elsewhere than the URL's default port.
    dsn = kube.mesh.dsn("beta", unquote(url.username or ""), unquote(url.password or ""))
    psql(dsn, "CREATE TABLE mine AS SELECT 7 AS x")
    assert psql(dsn, "SELECT x FROM mine") == "7"
    kube.assert_clean()


async def test_deleting_a_job_removes_its_pod_secret_anchor_user_and_data(
        kube: KubeMesh) -> None:
    kube.start_controller()
    await kube.mesh.create_job("gamma")
    assert await kube.mesh.catalog.principals("job-gamma")
    await kube.mesh.catalog.set_desired("gamma", "deleted")
    await until_job(kube, "gamma", lambda job, _: job is None)
    assert kube.pod("gamma") is None
    assert kube.emulator.get("secrets", NS, "job-gamma") is None
    assert kube.emulator.get("configmaps", NS, "job-gamma") is None
    assert await kube.mesh.catalog.principals("job-gamma") == []
    store = open_store(kube.store, s3_endpoint=kube.s3_endpoint)
    try:
        assert await store.list("gamma/") == []
    finally:
        await store.close()
    kube.assert_clean()


async def test_a_job_pod_deleted_behind_the_controllers_back_is_recovered(
        kube: KubeMesh) -> None:
    kube.start_controller()
    kube.mesh.start_router()
    await kube.mesh.add_user("alice", PW, alpha="write")
    job = await kube.mesh.create_job("alpha", archive_timeout=1)
    dsn = kube.mesh.dsn("alpha", "alice", PW)
    psql(dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    await kube.mesh.wait_for_base_backup("alpha")
    psql(dsn, "INSERT INTO t VALUES (2)")
    assert job.agent_url is not None
    await wait_until_archived(job.agent_url, dsn, kube.mesh.agent_headers("alpha"))
    old = kube.pod("alpha")
    assert old is not None

    core = kube.emulator.api_client()
    try:
        await asyncio.to_thread(core.call_api, "DELETE",
                                f"{kube.emulator.url}/api/v1/namespaces/{NS}/pods/job-alpha")
    finally:
        core.close()
    job = await until_job(kube, "alpha", recovered)
    new = kube.pod("alpha")
    assert new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]
    assert job is not None and job.host == new["status"]["podIP"]
    assert psql(dsn, "SELECT sum(x) FROM t") == "3"
    assert await kube.mesh.transitions("alpha", "recovering") == 1
    kube.assert_clean()


async def test_an_evicted_job_pod_is_replaced_and_recovered(kube: KubeMesh) -> None:
    kube.start_controller()
    kube.mesh.start_router()
    await kube.mesh.add_user("alice", PW, alpha="write")
    job = await kube.mesh.create_job("alpha", archive_timeout=1)
    dsn = kube.mesh.dsn("alpha", "alice", PW)
    psql(dsn, "CREATE TABLE t AS SELECT 42 AS x")
    await kube.mesh.wait_for_base_backup("alpha")
    # The first base backup may have begun before the table: its WAL must be in the store
    # (what a job loses at most is the last archive_timeout, and this test is not about that).
    assert job.agent_url is not None
    await wait_until_archived(job.agent_url, dsn, kube.mesh.agent_headers("alpha"))
    old = kube.pod("alpha")

    await asyncio.to_thread(kube.kubelet.fail_pod, "job-alpha")  # stays there, Failed
    await until_job(kube, "alpha", recovered)
    assert kube.pod("alpha")["metadata"]["uid"] != old["metadata"]["uid"]
    assert psql(dsn, "SELECT x FROM t") == "42"
    kube.assert_clean()


async def test_when_the_leader_dies_mid_transition_the_other_replica_finishes_it(
        kube: KubeMesh) -> None:
    kube.lease = LEASE
    first = kube.start_controller("first")
    first.wait_for_log(r"leading: lease")
    second = kube.start_replica("second")
    second.wait_for_log(r"candidate second")
    await kube.mesh.catalog.create_job("delta", {})
    # The first replica is creating the job: its pod exists, the job is not running yet.
    pod = await kube.emulator.wait_for("pods", NS, "job-delta", lambda p: p is not None)
    assert pod is not None
    first.kill()
    killed = time.monotonic()
    mid = await kube.mesh.catalog.job("delta")
    assert mid is not None and mid.state == "creating"
    await asyncio.to_thread(second.wait_for_log, r"leading: lease", LEASE * 3)
    assert time.monotonic() - killed < LEASE * 2 + 1
    job = await kube.mesh.wait_state("delta", "running", timeout=120)
    now = kube.pod("delta")
    assert now is not None and now["metadata"]["uid"] == pod["metadata"]["uid"]  # adopted
    assert job.host == now["status"]["podIP"]
    assert psql(f"postgresql://job_owner:{job.backend_password}@{job.host}:5432/job_delta",
                "SELECT 1") == "1"
    kube.assert_clean()


async def test_a_leader_that_loses_its_lease_exits_at_once(kube: KubeMesh) -> None:
    kube.lease = LEASE
    leader = kube.start_controller("first")
    leader.wait_for_log(r"leading: lease")
    with kube.emulator.api_client() as api:
        leases = client.CoordinationV1Api(api)
        lease = api.sanitize_for_serialization(await asyncio.to_thread(
            leases.read_namespaced_lease, "jobmesh-controller", NS))
        lease["spec"]["holderIdentity"] = "usurper"  # as if its lease had expired elsewhere
        await asyncio.to_thread(leases.replace_namespaced_lease, "jobmesh-controller", NS,
                                lease)
    code = await asyncio.to_thread(leader.proc.wait, LEASE * 2)
    assert code == 3
    leader.wait_for_log(r"lost the leader lease")
    kube.assert_clean()


# --- the backend alone, against the API (no kubelet: pods stay Pending) -----------------------


@pytest.fixture
async def backend(catalog: Catalog, pg_root: Path) -> AsyncIterator[tuple[Any, K8sEmulator]]:
    from jobmesh.controller.backends.kubernetes.backend import KubernetesBackend
    from jobmesh.controller.backends.kubernetes.objects import PodSettings

    store = pg_root / f"store-{os.urandom(4).hex()}"
    with K8sEmulator() as emulator, emulator.api_client() as api:
        b = KubernetesBackend(api, catalog, PodSettings(NS, "jobmesh:test", f"file://{store}"),
                              router_service="jobmesh-router.jm.svc",
                              agent_key=b"a key for the agents' tokens", start_timeout=5)
        await b.start()
        try:
            yield b, emulator
        finally:
            await b.close()
        assert emulator.rejected == []


async def test_the_network_policy_is_made_once_and_kept_in_step(
        backend: tuple[Any, K8sEmulator]) -> None:
    b, emulator = backend
    made = emulator.get("networkpolicies", NS, "jobmesh-jobs")
    assert made is not None
    await b.start()  # again: nothing changes
    assert emulator.get("networkpolicies", NS, "jobmesh-jobs") == made
    with emulator.api_client() as api:
        await asyncio.to_thread(
            client.NetworkingV1Api(api).patch_namespaced_network_policy, "jobmesh-jobs", NS,
            {"spec": {"ingress": [{}]}})  # someone opened it to everything
    await b.start()
    assert emulator.get("networkpolicies", NS, "jobmesh-jobs")["spec"] == made["spec"]


async def test_orphans_are_job_pods_the_catalog_does_not_know(
        backend: tuple[Any, K8sEmulator]) -> None:
    from jobmesh.controller.backends.kubernetes import objects as k8s_objects

    b, emulator = backend
    with emulator.api_client() as api:
        for job_id in ("known", "stray_one"):
            pod = k8s_objects.job_pod(job_id, {}, b.settings, restore=True, owner_uid="u")
            await asyncio.to_thread(client.CoreV1Api(api).create_namespaced_pod, NS, pod)
    assert await b.orphans({"known"}) == ["stray_one"]
    await b.stop_orphan("stray_one")
    assert await b.orphans({"known"}) == []
    assert emulator.get("pods", NS, "job-known") is not None


async def test_a_pod_that_never_gets_ready_fails_the_start_in_one_line(
        backend: tuple[Any, K8sEmulator], catalog: Catalog) -> None:
    from jobmesh.controller.core.backend import BackendError

    b, emulator = backend
    job = await catalog.create_job("slow")
    said: list[str] = []

    async def progress(text: str) -> None:
        said.append(text)

    with pytest.raises(BackendError, match=r"pod job-slow was not ready within 5 s \(pod "
                                           r"Pending\)"):
        await b.create(job, progress)
    assert said == ["pod Pending"]
    assert await b.alive(job) is True  # Pending: not dead (yet)
    secret = emulator.get("secrets", NS, "job-slow")
    anchor = emulator.get("configmaps", NS, "job-slow")
    pod = emulator.get("pods", NS, "job-slow")
    assert anchor is not None and secret is not None and pod is not None
    for owned in (secret, pod):
        assert owned["metadata"]["ownerReferences"][0]["uid"] == anchor["metadata"]["uid"]
    [user] = await catalog.principals("job-slow")
    assert [(g.pattern, g.access) for g in user.grants] == [("slow", "write")]


async def test_alive_without_a_pod_is_false(backend: tuple[Any, K8sEmulator],
                                            catalog: Catalog) -> None:
    b, _ = backend
    assert await b.alive(await catalog.create_job("nothing")) is False


async def test_a_secret_and_user_left_by_an_earlier_job_of_that_id_are_brought_up_to_date(
        backend: tuple[Any, K8sEmulator], catalog: Catalog) -> None:
    from jobmesh.controller.backends.kubernetes import objects as k8s_objects
    from jobmesh.controller.catalog.passwords import scram_verifier
    from jobmesh.controller.core.backend import BackendError

    b, emulator = backend
    with emulator.api_client() as api:
        old = k8s_objects.job_secret(NS, "again", "old-password", "postgresql://old", "u",
                                     "old-agent-token")
        del old["metadata"]["ownerReferences"]
        await asyncio.to_thread(client.CoreV1Api(api).create_namespaced_secret, NS, old)
    await catalog.create_principal("job-again", scram_verifier("old-password"))
    job = await catalog.create_job("again")
    with pytest.raises(BackendError):  # no kubelet: the pod never gets ready
        await b.create(job, lambda _text: asyncio.sleep(0))
    secret = emulator.get("secrets", NS, "job-again")
    assert secret is not None
    assert base64.b64decode(secret["data"]["backend-password"]).decode() == job.backend_password
    [user] = await catalog.principals("job-again")
    assert parse_verifier(user.verifier).matches(job.backend_password)
