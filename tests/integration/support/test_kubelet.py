"""The Kubernetes test infrastructure: the API emulator and the test kubelet.

The Kubernetes backend's tests stand on these two, so here they are held to
what a real cluster does: strict validation, optimistic concurrency,
selectors, watches, and pods that really run, probe, fail and stop.

Over ~400 lines on purpose: one specification per behaviour of the two, sharing this
module's emulator and kubelet fixtures (one of each per module, which is what keeps
these tests fast).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from jobmesh.agent.postgres import pid_alive
from tests.support.k8s_emulator import K8sEmulator, api_server
from tests.support.kubelet import Kubelet, expand, expand_static, mount_rewriter
from tests.support.waiting import until

NS = "jm"
Obj = dict[str, Any]


@pytest.fixture
def emulator() -> Iterator[K8sEmulator]:
    with K8sEmulator() as emu:
        yield emu


@pytest.fixture
def api(emulator: K8sEmulator) -> Iterator[client.ApiClient]:
    with emulator.api_client() as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def kubelet(emulator: K8sEmulator, pg_root: Path) -> Iterator[Kubelet]:
    """A kubelet for namespace ``jm``; afterwards nothing it started is left running."""
    root = pg_root / f"kubelet-{os.urandom(4).hex()}"
    with Kubelet(emulator.url, NS, root, probe_period=0.1, max_grace=3) as k:
        emulator.serve_pod_logs(k.read_log)
        yield k
    assert k.pids() == []
    assert k.errors == []
    shutil.rmtree(root, ignore_errors=True)


def pod(name: str, *containers: Obj, labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": "jobmesh"}},
            "spec": {"containers": list(containers), **spec}}


def container(name: str, *command: str, **extra: Any) -> Obj:
    return {"name": name, "image": "jobmesh:test", "command": list(command), **extra}


def condition(obj: Obj | None, kind: str) -> bool:
    return obj is not None and any(c["type"] == kind and c["status"] == "True"
                                   for c in obj.get("status", {}).get("conditions", []))


def ready(obj: Obj | None) -> bool:
    return condition(obj, "Ready")


def phase(*phases: str) -> Callable[[Obj | None], bool]:
    return lambda obj: obj is not None and obj.get("status", {}).get("phase") in phases


def gone(obj: Obj | None) -> bool:
    return obj is None


POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


# --- the emulator ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_valid_pod_is_stored_with_server_fields(emulator: K8sEmulator,
                                                  core: client.CoreV1Api) -> None:
    created = core.create_namespaced_pod(NS, pod("p", container("c", "true")))

    assert created.metadata.namespace == NS
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert int(created.metadata.resource_version) > 0
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"
    assert emulator.get("pods", NS, "p")["metadata"]["uid"] == created.metadata.uid
    assert emulator.rejected == []


@pytest.mark.timeout(30)
def test_an_unknown_field_is_rejected_with_422(emulator: K8sEmulator,
                                              api: client.ApiClient) -> None:
    body = pod("p", container("c", "true", bogus=1))  # the client's own models would refuse it

    response = api.call_api("POST", f"{emulator.url}/api/v1/namespaces/{NS}/pods",
                            header_params={"Content-Type": "application/json"}, body=body)

    assert response.status == 422
    status = json.loads(response.read())
    assert status["reason"] == "Invalid"
    assert "'bogus' was unexpected" in status["message"]
    [rejection] = emulator.rejected
    assert (rejection.kind, rejection.name) == ("Pod", "p")
    assert emulator.objects("pods", NS) == []


@pytest.mark.parametrize("bad", [
    {"metadata": {"name": "job_42"}},                              # underscores: not DNS-1123
    {"metadata": {"name": "p", "labels": {"job": "x" * 64}}},      # label values: 63 at most
    {"spec": {"containers": [container("c", "true", volumeMounts=[
        {"name": "nowhere", "mountPath": "/data"}])]}},              # a mount of no volume
])
@pytest.mark.timeout(30)
def test_what_the_api_server_forbids_beyond_the_schema_is_rejected(
        bad: Obj, emulator: K8sEmulator, core: client.CoreV1Api) -> None:
    body = pod("p", container("c", "true"))
    body = {**body, "metadata": {**body["metadata"], **bad.get("metadata", {})},
            "spec": {**body["spec"], **bad.get("spec", {})}}

    with pytest.raises(ApiException) as caught:
        core.create_namespaced_pod(NS, body)

    assert caught.value.status == 422
    assert len(emulator.rejected) == 1


@pytest.mark.timeout(30)
def test_replacing_a_lease_with_a_stale_resource_version_is_a_conflict(
        api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    lease = leases.create_namespaced_lease(NS, {"metadata": {"name": "leader"},
                                                "spec": {"holderIdentity": "a"}})
    lease.spec.holder_identity = "b"
    assert leases.replace_namespaced_lease("leader", NS, lease).spec.holder_identity == "b"

    lease.spec.holder_identity = "c"  # still carries the resourceVersion it was read with
    with pytest.raises(ApiException) as caught:
        leases.replace_namespaced_lease("leader", NS, lease)

    assert caught.value.status == 409
    assert leases.read_namespaced_lease("leader", NS).spec.holder_identity == "b"


@pytest.mark.timeout(30)
def test_label_selectors_filter_lists(core: client.CoreV1Api) -> None:
    for name, labels in [("a", {"app": "jobmesh", "job": "1"}),
                         ("b", {"app": "jobmesh", "role": "router"}),
                         ("c", {"app": "other"})]:
        core.create_namespaced_pod(NS, pod(name, container("c", "true"), labels=labels))

    def names(selector: str) -> list[str]:
        listed = core.list_namespaced_pod(NS, label_selector=selector)
        return [p.metadata.name for p in listed.items]

    assert names("app=jobmesh") == ["a", "b"]
    assert names("app=jobmesh,role!=router") == ["a"]
    assert names("role in (router,controller)") == ["b"]
    assert names("!job") == ["b", "c"]
    assert names("app notin (jobmesh)") == ["c"]


@pytest.mark.timeout(30)
def test_a_watch_ends_at_its_timeout_and_resumes_from_a_resource_version(
        core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("before", container("c", "true")))
    listed = core.list_namespaced_pod(NS)
    core.create_namespaced_pod(NS, pod("after", container("c", "true")))
    core.delete_namespaced_pod("before", NS)  # not bound to a node: deleted at once

    started = time.monotonic()
    events = [(e["type"], e["raw_object"]["metadata"]["name"])
              for e in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1,
                                            resource_version=listed.metadata.resource_version)]

    assert 0.9 < time.monotonic() - started < 5
    assert events == [("ADDED", "after"), ("DELETED", "before")]


@pytest.mark.timeout(30)
def test_a_watch_from_a_forgotten_resource_version_is_gone(
        monkeypatch: pytest.MonkeyPatch, core: client.CoreV1Api) -> None:
    monkeypatch.setattr(api_server, "HISTORY_LIMIT", 4)  # where the server reads it
    first = core.create_namespaced_pod(NS, pod("p0", container("c", "true")))
    for i in range(1, 6):
        core.create_namespaced_pod(NS, pod(f"p{i}", container("c", "true")))

    with pytest.raises(ApiException) as caught:
        list(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1,
                                  resource_version=first.metadata.resource_version))

    assert caught.value.status == 410


@pytest.mark.timeout(30)
def test_an_object_leaving_a_watched_selector_is_deleted_for_that_watch(
        core: client.CoreV1Api) -> None:
    listed = core.list_namespaced_pod(NS)
    core.create_namespaced_pod(NS, pod("p", container("c", "true"), labels={"app": "jobmesh"}))
    core.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"app": "other"}}})

    events = [e["type"] for e in watch.Watch().stream(
        core.list_namespaced_pod, NS, label_selector="app=jobmesh", timeout_seconds=1,
        resource_version=listed.metadata.resource_version)]

    assert events == ["ADDED", "DELETED"]


@pytest.mark.timeout(30)
def test_status_is_written_only_through_its_subresource(emulator: K8sEmulator,
                                                       core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("p", container("c", "true")))

    core.patch_namespaced_pod("p", NS, {"status": {"phase": "Running"}})
    core.patch_namespaced_pod_status("p", NS, {"metadata": {"labels": {"x": "y"}},
                                               "status": {"phase": "Succeeded"}})

    stored = emulator.get("pods", NS, "p")
    assert stored is not None
    assert stored["status"]["phase"] == "Succeeded"
    assert "x" not in stored["metadata"]["labels"]


@pytest.mark.timeout(30)
def test_a_bound_pod_stays_until_its_kubelet_finishes_the_delete(
        emulator: K8sEmulator, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("p", container("c", "true")))
    core.create_namespaced_pod_binding("p", NS, {"target": {"kind": "Node", "name": "n1"},
                                                 "metadata": {"name": "p"}},
                                       _preload_content=False)

    core.delete_namespaced_pod("p", NS)

    marked = emulator.get("pods", NS, "p")
    assert marked is not None and marked["metadata"]["deletionTimestamp"]
    core.delete_namespaced_pod("p", NS, grace_period_seconds=0)
    assert emulator.get("pods", NS, "p") is None


@pytest.mark.timeout(30)
def test_a_kubeconfig_points_the_official_client_at_the_emulator(
        emulator: K8sEmulator, core: client.CoreV1Api, tmp_path: Path) -> None:
    core.create_namespaced_config_map(NS, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
    path = emulator.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)

    with config.new_client_from_config(config_file=str(path)) as loaded:
        found = client.CoreV1Api(loaded).read_namespaced_config_map("cm", NS)

    assert found.data == {"k": "v"}


@pytest.mark.timeout(30)
def test_finalizers_hold_a_deleted_object_until_the_last_one_goes(
        emulator: K8sEmulator, core: client.CoreV1Api) -> None:
    body = pod("p", container("c", "true"))
    body["metadata"]["finalizers"] = ["jobmesh.io/snapshot"]
    core.create_namespaced_pod(NS, body)
    core.create_namespaced_pod_binding("p", NS, {"target": {"kind": "Node", "name": "n1"},
                                                 "metadata": {"name": "p"}},
                                       _preload_content=False)
    core.delete_namespaced_pod("p", NS)
    core.delete_namespaced_pod("p", NS, grace_period_seconds=0)  # as its kubelet would
    assert emulator.get("pods", NS, "p") is not None

    core.patch_namespaced_pod("p", NS, {"metadata": {"finalizers": None}})

    assert emulator.get("pods", NS, "p") is None


# --- the kubelet: pure parts ------------------------------------------------------------


def test_expansion_follows_kubernetes() -> None:
    env = {"A": "1", "B": "x y"}

    assert expand("$(A)-$(B)", env) == "1-x y"
    assert expand("$$(A) $(NOPE) $A $(", env) == "$(A) $(NOPE) $A $("


def test_exec_probes_expand_only_literal_env_values() -> None:
    env_specs = [{"name": "LIT", "value": "5432"}, POD_IP]

    assert expand_static(["-p", "$(LIT)", "-h", "$(POD_IP)", "$(NOPE)"], env_specs) == \
        ["-p", "5432", "-h", "", "$(NOPE)"]


def test_mount_paths_are_rewritten_where_a_path_starts() -> None:
    rewrite = mount_rewriter({"/data": Path("/h/d"), "/data/wal": Path("/h/w")})

    assert rewrite("/data/pgdata") == "/h/d/pgdata"
    assert rewrite("--pgdata=/data") == "--pgdata=/h/d"
    assert rewrite("/data/wal/0001") == "/h/w/0001"
    assert rewrite("/data/walrus") == "/h/d/walrus"
    assert rewrite("file:///data/store") == "file:///h/d/store"
    assert rewrite("/database /srv/data x/data") == "/database /srv/data x/data"


# --- the kubelet: pods that run ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_init_container_fills_an_empty_dir_the_main_container_serves(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    www = [{"name": "www", "mountPath": "/srv/www"}]
    core.create_namespaced_pod(NS, pod(
        "web",
        container("serve", "python", "-m", "http.server", "--bind", "$(POD_IP)",
                  "--directory", "/srv/www", "8080", env=[POD_IP], volumeMounts=www,
                  ports=[{"name": "http", "containerPort": 8080}],
                  readinessProbe={"httpGet": {"path": "/index.html", "port": "http"},
                                  "periodSeconds": 1}),
        initContainers=[container("fill", "sh", "-c", "echo hello > /srv/www/index.html",
                                  volumeMounts=www)],
        volumes=[{"name": "www", "emptyDir": {"sizeLimit": "1Mi"}}],
        restartPolicy="Never"))

    web = emulator.wait_for_sync("pods", NS, "web", ready)

    assert web is not None
    ip = web["status"]["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    assert condition(web, "Initialized") and condition(web, "ContainersReady")
    [init] = web["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    assert no_proxy.open(f"http://{ip}:8080/index.html", timeout=5).read() == b"hello\n"
    assert kubelet.run("web").size_limits == {"www": "1Mi"}
    assert "GET /index.html" in core.read_namespaced_pod_log("web", NS)
    assert emulator.rejected == []


@pytest.mark.timeout(60)
def test_env_comes_from_field_refs_and_secrets(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, {"metadata": {"name": "creds"},
                                       "data": {"password": "czNjcmV0"},  # "s3cret"
                                       "stringData": {"token": "t0k"}})
    def field(name: str, path: str) -> Obj:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    def secret(name: str, key: str) -> Obj:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": "creds", "key": key}}}

    env = [POD_IP, field("NAME", "metadata.name"), field("NAMESPACE", "metadata.namespace"),
           secret("PASSWORD", "password"), secret("TOKEN", "token"),
           {"name": "DSN", "value": "postgresql://u:$(PASSWORD)@$(POD_IP)/db"}]
    core.create_namespaced_pod(NS, pod(
        "env", container("show", "sh", "-c", 'echo "$NAME $NAMESPACE $PASSWORD $TOKEN $DSN"',
                         env=env),
        restartPolicy="Never"))

    done = emulator.wait_for_sync("pods", NS, "env", phase("Succeeded", "Failed"))

    assert done is not None and done["status"]["phase"] == "Succeeded"
    ip = done["status"]["podIP"]
    assert kubelet.log("env", "show").strip() == \
        f"env {NS} s3cret t0k postgresql://u:s3cret@{ip}/db"


@pytest.mark.timeout(60)
def test_a_missing_secret_keeps_the_pod_pending_until_it_exists(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    secret_env = {"name": "P", "valueFrom": {"secretKeyRef": {"name": "late", "key": "p"}}}
    core.create_namespaced_pod(NS, pod("p", container("c", "sh", "-c", 'echo "$P"',
                                                      env=[secret_env]),
                                       restartPolicy="Never"))

    def config_error(obj: Obj | None) -> bool:
        states = [s["state"] for s in (obj or {}).get("status", {}).get("containerStatuses", [])]
        return any(s.get("waiting", {}).get("reason") == "CreateContainerConfigError"
                   for s in states)

    emulator.wait_for_sync("pods", NS, "p", config_error)
    core.create_namespaced_secret(NS, {"metadata": {"name": "late"}, "stringData": {"p": "ok"}})

    emulator.wait_for_sync("pods", NS, "p", phase("Succeeded"))
    assert kubelet.log("p", "c").strip() == "ok"


@pytest.mark.timeout(60)
def test_an_exit_under_restart_policy_never_fails_the_pod(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("crash", container("c", "sh", "-c", "exit 3"),
                                       restartPolicy="Never"))

    failed = emulator.wait_for_sync("pods", NS, "crash", phase("Failed", "Succeeded"))

    assert failed is not None and failed["status"]["phase"] == "Failed"
    [status] = failed["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["state"]["terminated"]["reason"] == "Error"
    assert status["restartCount"] == 0 and not status["ready"]


@pytest.mark.timeout(60)
def test_a_killed_container_is_restarted_under_restart_policy_always(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("sleeper", container("c", "sleep", "300")))
    emulator.wait_for_sync("pods", NS, "sleeper", ready)

    kubelet.kill_container("sleeper", "c", signal.SIGKILL)

    def restarted(obj: Obj | None) -> bool:
        statuses = (obj or {}).get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("restartCount") == 1 and "running" in statuses[0]["state"]

    again = emulator.wait_for_sync("pods", NS, "sleeper", restarted)
    assert again is not None
    assert again["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 137
    assert again["status"]["phase"] == "Running"


@pytest.mark.timeout(60)
def test_deleting_a_pod_stops_every_process_it_started(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    # The background sleep outlives its shell's exec: only the container's end can stop it.
    core.create_namespaced_pod(NS, pod("p", container(
        "c", "sh", "-c", "sleep 300 & exec sleep 301"), terminationGracePeriodSeconds=1))
    emulator.wait_for_sync("pods", NS, "p", ready)
    # (ready: its shell has started, not yet necessarily forked the background sleep)
    def three() -> list[int] | None:
        found = kubelet.pids("p")
        return found if len(found) >= 3 else None

    pids = asyncio.run(until(three, "the shim, sleep 301 and sleep 300", timeout=30))

    core.delete_namespaced_pod("p", NS)

    emulator.wait_for_sync("pods", NS, "p", gone)
    assert [p for p in pids if pid_alive(p)] == []


@pytest.mark.timeout(60)
def test_an_evicted_pod_fails_with_its_reason_and_stops(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod("p", container("c", "sleep", "300"),
                                       terminationGracePeriodSeconds=1))
    emulator.wait_for_sync("pods", NS, "p", ready)

    kubelet.fail_pod("p", reason="Evicted")

    evicted = emulator.get("pods", NS, "p")
    assert evicted is not None
    assert (evicted["status"]["phase"], evicted["status"]["reason"]) == ("Failed", "Evicted")
    assert condition(evicted, "DisruptionTarget") and not ready(evicted)
    assert kubelet.pids("p") == []


@pytest.mark.timeout(60)
def test_what_the_kubelet_cannot_do_fails_the_pod_loudly(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, pod(
        "p", container("c", "true", volumeMounts=[{"name": "v", "mountPath": "/v"}]),
        volumes=[{"name": "v", "persistentVolumeClaim": {"claimName": "c"}}]))

    failed = emulator.wait_for_sync("pods", NS, "p", phase("Failed"))

    assert failed is not None and failed["status"]["reason"] == "UnsupportedByTestKubelet"


# --- the kubelet: a real PostgreSQL -----------------------------------------------------

PG_PASSWORD = "s3cret"


def postgres_pod(name: str) -> Obj:
    """What the backend's job pods will look like, reduced to Postgres itself."""
    data = [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}]
    pgdata = "/var/lib/postgresql/data/pgdata"
    return pod(
        name,
        container("postgres", "postgres", "-D", pgdata, "-c", "listen_addresses=$(POD_IP)",
                  "-c", "port=5432", "-c", "unix_socket_directories=/var/lib/postgresql/data",
                  "-c", "fsync=off", env=[POD_IP], volumeMounts=data,
                  ports=[{"name": "postgres", "containerPort": 5432}],
                  # $(POD_IP) would not expand in an exec probe (it comes from valueFrom).
                  readinessProbe={"exec": {"command": [
                      "sh", "-c", 'exec pg_isready -q -h "$POD_IP" -p 5432']},
                      "periodSeconds": 1}),
        initContainers=[container(
            "initdb", "initdb", "-D", pgdata, "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--pwfile=/etc/jobmesh/password",
            volumeMounts=[*data, {"name": "secret", "mountPath": "/etc/jobmesh"}])],
        volumes=[{"name": "pgdata", "emptyDir": {}},
                 {"name": "secret", "secret": {"secretName": "pg", "defaultMode": 0o400}}],
        securityContext={"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
        restartPolicy="Never", terminationGracePeriodSeconds=10)


@pytest.mark.timeout(120)
async def test_a_postgres_pod_serves_on_its_pod_ip_and_stops_on_delete(
        emulator: K8sEmulator, kubelet: Kubelet, core: client.CoreV1Api) -> None:
    await asyncio.to_thread(core.create_namespaced_secret, NS, {
        "metadata": {"name": "pg"}, "stringData": {"password": PG_PASSWORD}})
    await asyncio.to_thread(core.create_namespaced_pod, NS, postgres_pod("pg-0"))

    up = await emulator.wait_for("pods", NS, "pg-0", ready, timeout=60)

    assert up is not None
    ip = up["status"]["podIP"]
    conn = await asyncpg.connect(host=ip, port=5432, user="postgres", password=PG_PASSWORD,
                                 database="postgres")
    try:
        assert await conn.fetchval("SELECT host(inet_server_addr())") == ip
        assert await conn.fetchval("SELECT current_setting('data_directory')") == \
            str(kubelet.volume("pg-0", "pgdata") / "pgdata")
    finally:
        await conn.close()
    postgres = kubelet.pids("pg-0", "postgres")
    assert postgres

    await asyncio.to_thread(core.delete_namespaced_pod, "pg-0", NS)

    await emulator.wait_for("pods", NS, "pg-0", gone, timeout=30)
    assert [p for p in postgres if pid_alive(p)] == []
    assert "database system is shut down" in kubelet.log("pg-0", "postgres")
    assert emulator.rejected == []


# --- nothing escapes ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stopping_the_kubelet_kills_what_runs(emulator: K8sEmulator, core: client.CoreV1Api,
                                              pg_root: Path) -> None:
    root = pg_root / f"kubelet-{os.urandom(4).hex()}"
    with Kubelet(emulator.url, NS, root, probe_period=0.1, max_grace=1) as k:
        core.create_namespaced_pod(NS, pod("stubborn", container(
            "c", "sh", "-c", "trap '' TERM; sleep 300 & wait")))
        emulator.wait_for_sync("pods", NS, "stubborn", ready)
        pids = k.pids()
        assert pids

    assert [p for p in pids if pid_alive(p)] == []
    assert k.errors == []
    # the pod is untouched in the API: the kubelet went away, not the pod
    assert emulator.get("pods", NS, "stubborn") is not None
    shutil.rmtree(root, ignore_errors=True)
