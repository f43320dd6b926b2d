"""A container crash recovers in its pod; only a lost pod is restored from the store.

First what the Kubernetes backend relies on, held to the real kubelet: a dead container
restarted in the same pod (same volumes, same pod IP) under ``restartPolicy: OnFailure``,
with the real crash-loop back-off, ``restartCount`` and ``lastState``; a clean exit not
restarted. Then the backend on the API emulator and the test kubelet: ``kill -9`` of
PostgreSQL under writers loses no acknowledged commit and restores nothing; a failing init
step fails the start at once, without a retry loop; and a recovery waits for the old pod
to be gone before it makes a new one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from kubernetes import client

from jobmesh.agent.cas.objects import object_key
from jobmesh.agent.manifest import Manifest
from jobmesh.agent.store import get_bytes, open_store, put_bytes
from jobmesh.controller.backends.kubernetes import objects as k8s_objects
from jobmesh.controller.catalog.db import Catalog
from tests.support.k8s_emulator import K8sEmulator
from tests.support.kube_mesh import NS, KubeMesh
from tests.support.kubelet import Kubelet, RestartBackoff
from tests.support.ledger import Ledger
from tests.support.mesh import psql
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)
PW = "pw-123"
Obj = dict[str, Any]


# --- the test kubelet restarts as the real one does ------------------------------------------


@pytest.fixture
def emulator() -> Iterator[K8sEmulator]:
    with K8sEmulator() as emu:
        yield emu


@pytest.fixture
def core(emulator: K8sEmulator) -> Iterator[client.CoreV1Api]:
    with emulator.api_client() as api:
        yield client.CoreV1Api(api)


def run_kubelet(emulator: K8sEmulator, root: Path, **kwargs: Any) -> Kubelet:
    return Kubelet(emulator.url, NS, root, probe_period=0.1, max_grace=3, **kwargs)


def on_failure_pod(name: str, *containers: Obj, init: list[Obj] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "OnFailure", "initContainers": init or [],
                     "containers": list(containers),
                     "volumes": [{"name": "data", "emptyDir": {}}]}}


def box(name: str, script: str) -> Obj:
    return {"name": name, "image": "jobmesh:test", "command": ["sh", "-c", script],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}


def statuses(pod: Obj | None, kind: str = "containerStatuses") -> dict[str, Obj]:
    return {s["name"]: s for s in ((pod or {}).get("status") or {}).get(kind) or []}


def runs(volume: Path, count: int, timeout: float = 30) -> None:
    """Until the container's runs have written ``count`` lines into the volume's ``runs``
    (a file nothing announces: looked at every 50 ms)."""
    deadline = time.monotonic() + timeout
    path = volume / "runs"
    while not (path.exists() and len(path.read_text().split()) >= count):
        assert time.monotonic() < deadline, f"{path}: not {count} runs within {timeout} s"
        time.sleep(0.05)
    assert len(path.read_text().split()) == count


@pytest.mark.timeout(60)
def test_a_killed_container_restarts_in_its_pod_at_once_then_backs_off_10_s(
        emulator: K8sEmulator, core: client.CoreV1Api, pg_root: Path) -> None:
    with run_kubelet(emulator, pg_root / "kubelet") as kubelet:
        core.create_namespaced_pod(NS, on_failure_pod(
            "p", box("c", 'echo "$(date +%s%N)" >> /data/runs; exec sleep 300')))
        first = emulator.wait_for_sync("pods", NS, "p", lambda p: "running" in statuses(p)
                                       .get("c", {}).get("state", {}))
        assert first is not None
        ip = first["status"]["podIP"]
        volume = kubelet.volume("p", "data")
        runs(volume, 1)  # "running" is the process started, not its line written

        kubelet.kill_container("p", "c", signal.SIGKILL)
        again = emulator.wait_for_sync("pods", NS, "p", lambda p: statuses(p).get(
            "c", {}).get("restartCount") == 1 and "running" in statuses(p)["c"]["state"])
        assert again is not None
        c = statuses(again)["c"]
        assert c["lastState"]["terminated"]["exitCode"] == 137
        assert c["lastState"]["terminated"]["reason"] == "Error"
        assert again["metadata"]["uid"] == first["metadata"]["uid"]
        assert again["status"]["podIP"] == ip and again["status"]["phase"] == "Running"
        runs(volume, 2)  # the same emptyDir

        kubelet.kill_container("p", "c", signal.SIGKILL)  # a second crash: the back-off
        waiting = emulator.wait_for_sync("pods", NS, "p", lambda p: "waiting" in statuses(
            p).get("c", {}).get("state", {}))
        assert waiting is not None
        c = statuses(waiting)["c"]
        assert c["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert c["state"]["waiting"]["message"].startswith(
            "back-off 10s restarting failed container=c pod=p_jm(")
        assert c["restartCount"] == 1 and c["lastState"]["terminated"]["exitCode"] == 137
        assert kubelet.run("p").container("c").backoff == 20.0  # the next one
        assert not kubelet.errors


@pytest.mark.timeout(60)
def test_a_crash_loop_doubles_its_back_off_up_to_the_cap(
        emulator: K8sEmulator, core: client.CoreV1Api, pg_root: Path) -> None:
    with run_kubelet(emulator, pg_root / "kubelet",
                     restart_backoff=RestartBackoff.shortened(0.1, 0.4)) as kubelet:
        core.create_namespaced_pod(NS, on_failure_pod("p", box("c", "exit 3")))
        looped = emulator.wait_for_sync("pods", NS, "p", lambda p: statuses(p).get(
            "c", {}).get("restartCount", 0) >= 5)
        assert looped is not None and looped["status"]["phase"] == "Running"
        assert statuses(looped)["c"]["lastState"]["terminated"]["exitCode"] == 3
        assert kubelet.run("p").container("c").backoff == 0.4
        assert not kubelet.errors


@pytest.mark.timeout(60)
def test_a_clean_exit_under_on_failure_is_not_restarted(
        emulator: K8sEmulator, core: client.CoreV1Api, pg_root: Path) -> None:
    """What a pause relies on: Postgres stopped by a fast shutdown stays stopped."""
    with run_kubelet(emulator, pg_root / "kubelet") as kubelet:
        core.create_namespaced_pod(NS, on_failure_pod(
            "p", box("done", "exit 0"), box("side", "exec sleep 300")))
        ended = emulator.wait_for_sync("pods", NS, "p", lambda p: "terminated" in statuses(
            p).get("done", {}).get("state", {}))
        assert ended is not None
        done = statuses(ended)["done"]
        assert done["state"]["terminated"]["reason"] == "Completed"
        assert done["restartCount"] == 0 and ended["status"]["phase"] == "Running"
        assert kubelet.run("p").container("done").restart_at is None
        assert not kubelet.errors


@pytest.mark.timeout(60)
def test_a_failed_init_container_is_run_again_under_on_failure(
        emulator: K8sEmulator, core: client.CoreV1Api, pg_root: Path) -> None:
    """The loop the backend has to cut: the pod stays Pending, the init step reruns."""
    with run_kubelet(emulator, pg_root / "kubelet") as kubelet:
        core.create_namespaced_pod(NS, on_failure_pod(
            "p", box("main", "exec sleep 300"), init=[box("init", "echo no >&2; exit 1")]))
        retried = emulator.wait_for_sync("pods", NS, "p", lambda p: statuses(
            p, "initContainerStatuses").get("init", {}).get("restartCount", 0) >= 1
            and "waiting" in statuses(p, "initContainerStatuses")["init"]["state"])
        assert retried is not None and retried["status"]["phase"] == "Pending"
        init = statuses(retried, "initContainerStatuses")["init"]
        assert init["lastState"]["terminated"]["exitCode"] == 1
        assert init["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert "main" not in kubelet.pids("p") and not kubelet.errors


# --- the backend: a crash recovers in place ------------------------------------------------


async def agent_status(agent_url: str, headers: dict[str, str]) -> Obj:
    async with aiohttp.ClientSession() as http, http.get(f"{agent_url}/status",
                                                         headers=headers) as resp:
        return dict(await resp.json())


async def test_a_killed_postgres_restarts_in_its_pod_and_loses_no_acknowledged_commit(
        kube: KubeMesh) -> None:
    kube.start_controller()
    kube.mesh.start_router()
    await kube.mesh.add_user("alice", PW, alpha="write")
    job = await kube.mesh.create_job("alpha")
    dsn = kube.mesh.dsn("alpha", "alice", PW)
    psql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    assert job.agent_url is not None
    before = kube.pod("alpha")
    assert before is not None
    pid_before = (await agent_status(job.agent_url, kube.mesh.agent_headers("alpha")))[
        "postgres"]["pid"]

    ledger = Ledger(dsn)
    writers = [asyncio.create_task(_write(ledger, w)) for w in range(4)]
    try:
        await ledger.until_acknowledged(1000)
        # kill -9 of the container's command (the postmaster); the container's end takes
        # every backend with it, as a runtime's does.
        await asyncio.to_thread(kube.kubelet.kill_container, "job-alpha", "postgres")
        killed_at = len(ledger.acknowledged)
        await ledger.until_acknowledged(killed_at + 1000, timeout=120)  # writing again
    finally:
        ledger.stop.set()
        await asyncio.gather(*writers)
    conn = await asyncpg.connect(dsn)
    try:
        present = {r["id"] for r in await conn.fetch("SELECT id FROM t")}
    finally:
        await conn.close()
    lost = set(ledger.acknowledged) - present
    print(f"\nkill -9 of PostgreSQL in its pod under 4 writers: {len(lost)} of "
          f"{len(ledger.acknowledged)} acknowledged commits lost; {ledger.reconnects} "
          f"reconnects, {len(ledger.refused)} connects refused meanwhile")
    assert not lost, f"{len(lost)} acknowledged commits lost, e.g. {sorted(lost)[:5]}"

    after = kube.pod("alpha")
    assert after is not None
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # the same pod
    assert after["status"]["podIP"] == before["status"]["podIP"]
    pg = statuses(after)["postgres"]
    assert pg["restartCount"] == 1 and pg["lastState"]["terminated"]["exitCode"] == 137
    assert statuses(after)["agent"]["restartCount"] == 0  # the agent lived on
    # Nothing came from the store: the init step ran once, in this pod only; no transition.
    [run] = kube.kubelet.runs("job-alpha")
    assert run.container("init").restarts == 0
    assert kube.kubelet.log("job-alpha", "init").count("jobmesh agent") <= 1
    assert await kube.mesh.transitions("alpha", "failed") == 0
    assert await kube.mesh.transitions("alpha", "recovering") == 0
    current = await kube.mesh.catalog.job("alpha")
    assert current is not None and current.state == "running" and current.host == job.host
    # The agent serves the restarted server, and ships what it archives: a segment's
    # worth of WAL (as its owner, past the router: no ledger row) must reach the store.
    status = await agent_status(job.agent_url, kube.mesh.agent_headers("alpha"))
    assert status["postgres"]["running"] and status["postgres"]["pid"] != pid_before
    shipped = status["wal"]["uploaded"]
    psql(f"postgresql://job_owner:{job.backend_password}@{job.host}:5432/job_alpha",
         "INSERT INTO t SELECT -g FROM generate_series(1, 400000) g; SELECT 1")
    await until(lambda: _shipped_more(job.agent_url, kube.mesh.agent_headers("alpha"), shipped),
                "the restarted server's WAL shipped")
    kube.assert_clean()


async def _shipped_more(agent_url: str | None, headers: dict[str, str], than: int) -> bool:
    assert agent_url is not None
    wal = (await agent_status(agent_url, headers))["wal"]
    return bool(wal["uploaded"] > than and wal["spool_backlog"] == 0)


async def _write(ledger: Ledger, writer: int) -> None:
    """``ledger.write``, begun again when asyncpg loses track of a connection that died
    mid-statement (InternalClientError: "another operation is in progress"), which the
    ledger does not catch; the id in flight was never acknowledged."""
    while not ledger.stop.is_set():
        try:
            await ledger.write(writer)
        except asyncpg.InternalClientError:
            ledger.reconnects += 1


# --- the backend: a failing init step, and the fence ---------------------------------------


async def test_an_init_step_that_fails_fails_the_start_and_its_pod_is_deleted(
        kube: KubeMesh) -> None:
    """Every recovery point is damaged: ``agent restore`` fails in the init container.
    Each attempt's pod is deleted at once (under OnFailure the kubelet would run the
    step again and again), and the error says why."""
    kube.start_controller()
    await kube.mesh.create_job("alpha")
    await kube.mesh.wait_for_base_backup("alpha")
    await kube.mesh.pause("alpha")
    store = open_store(kube.store, s3_endpoint=kube.s3_endpoint)
    try:
        manifests = [Manifest.from_json(await get_bytes(store, o.key))
                     for o in await store.list("alpha/snapshots/")
                     if o.key.endswith("/manifest.json")]
        data = sorted({object_key(n) for m in manifests for n in m.object_names()})
        assert len(manifests) >= 2 and data  # the base backup and the pause snapshot
        for key in data:  # same size, wrong bytes: each fails to hash back to its name
            size = await store.size(key)
            await put_bytes(store, key, os.urandom(size or 1))
    finally:
        await store.close()
    first = kube.pod("alpha")
    assert first is None

    await kube.mesh.catalog.set_desired("alpha", "running")
    job = await kube.mesh.wait_for("alpha", lambda j: "container init exited with 1"
                                   in (j.error or "") and j.attempts >= 2, timeout=180)
    assert "failed to start" in (job.error or "")
    runs = kube.kubelet.runs("job-alpha")
    assert len(runs) >= 2
    for run in runs[:-1]:  # every earlier attempt's pod is gone, its init step not looping
        assert run.failed.is_set() and run.container("init").restarts <= 1
    await kube.mesh.catalog.set_desired("alpha", "deleted")
    await until(lambda: _gone(kube), "the job deleted", timeout=120)
    kube.assert_clean()


async def _gone(kube: KubeMesh) -> bool:
    return await kube.mesh.catalog.job("alpha") is None and kube.pod("alpha") is None


@pytest.fixture
async def fenced(catalog: Catalog, pg_root: Path) -> AsyncIterator[tuple[Any, K8sEmulator]]:
    """The backend alone, with no kubelet: a pod bound to a node stays until that node's
    kubelet confirms its delete, as a pod on an unreachable node does."""
    from jobmesh.controller.backends.kubernetes.backend import KubernetesBackend

    settings = k8s_objects.PodSettings(NS, "jobmesh:test", f"file://{pg_root}/store-fence",
                                       grace_seconds=1)
    with K8sEmulator() as emulator, emulator.api_client() as api:
        b = KubernetesBackend(api, catalog, settings, router_service="r",
                              agent_key=b"a key for the agents' tokens", start_timeout=5,
                              gone_timeout=1)
        await b.start()
        try:
            yield b, emulator
        finally:
            await b.close()
        assert emulator.rejected == []


async def test_a_recovery_waits_until_the_old_pod_is_gone_before_a_new_one(
        fenced: tuple[Any, K8sEmulator], catalog: Catalog) -> None:
    from jobmesh.controller.core.backend import BackendError, PermanentError

    b, emulator = fenced
    job = await catalog.create_job("alpha")
    pod = k8s_objects.job_pod("alpha", {}, b.settings, restore=False, owner_uid="u")
    pod["spec"]["nodeName"] = "lost-node"
    with emulator.api_client() as api:
        core = client.CoreV1Api(api)
        await asyncio.to_thread(core.create_namespaced_pod, NS, pod)
        # The node is unreachable: its pods are deleted (as the taint manager does) and
        # stay Terminating, since no kubelet confirms their containers stopped.
        await asyncio.to_thread(core.delete_namespaced_pod, "job-alpha", NS,
                                grace_period_seconds=30)
    old = emulator.get("pods", NS, "job-alpha")
    assert old is not None and old["metadata"].get("deletionTimestamp")

    with pytest.raises(BackendError, match=r"pod job-alpha is still there 2 s after it was "
                                           r"deleted \(lost-node has not confirmed .*\): no "
                                           r"new pod of job alpha is started until it is gone"):
        await b.recover(job, lambda _text: asyncio.sleep(0))
    now = emulator.get("pods", NS, "job-alpha")
    assert now is not None and now["metadata"]["uid"] == old["metadata"]["uid"]  # no 2nd pod

    with emulator.api_client() as api:  # the node's kubelet (or an operator) finishes it
        await asyncio.to_thread(client.CoreV1Api(api).delete_namespaced_pod, "job-alpha", NS,
                                grace_period_seconds=0)
    # Past the fence: the next step is the store (empty here), before any new pod.
    with pytest.raises(PermanentError, match="no snapshot to restore"):
        await b.recover(job, lambda _text: asyncio.sleep(0))
    assert emulator.get("pods", NS, "job-alpha") is None
