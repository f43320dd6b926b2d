"""The Kubernetes objects of a job, as built (no API server): their conventions, and every
one of them valid against the newest Kubernetes schema, strictly (no unknown field)."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import kubernetes_validate
import pytest
from kubernetes import client
from kubernetes_validate.utils import major_minor

from jobmesh.controller.backends.kubernetes import objects as o
from jobmesh.controller.catalog.models import JOB_ID
from jobmesh.controller.storage.access import Credentials
from tests.support.k8s_emulator import semantic_problems

NEWEST = major_minor(kubernetes_validate.latest_version())
SETTINGS = o.PodSettings(namespace="jm", image="registry.example.com/jobmesh:1",
                         store_url="s3://bucket/jobs", s3_endpoint="http://minio:9000",
                         s3_secret="jobmesh-s3", archive_timeout=30, base_backup_interval=600)
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def new_pod(job_id: str = "alpha", **spec: Any) -> dict[str, Any]:
    return o.job_pod(job_id, spec, SETTINGS, restore=False, owner_uid="anchor-uid")


def restore_pod(job_id: str = "alpha", **spec: Any) -> dict[str, Any]:
    return o.job_pod(job_id, spec, SETTINGS, restore=True, owner_uid="anchor-uid")


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in spec["containers"] + spec["initContainers"] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


ALL_OBJECTS = {
    "new pod": new_pod(),
    "restore pod": restore_pod(),
    "pod with resources": new_pod("beta", cpu="2", memory="4Gi", disk="50Gi",
                                  archive_timeout=0),
    "pod of an odd id": restore_pod("odd_id-"),
    "pod without S3": o.job_pod("gamma", {}, o.PodSettings("jm", "img", "file:///store"),
                                restore=False, owner_uid="u"),
    "secret": o.job_secret("jm", "alpha", "pw", o.connection_url("alpha", "pw", "router"), "u",
                           "a-token-of-the-agent"),
    "anchor": o.anchor("jm", "alpha"),
    "network policy": o.network_policy("jm"),
}


@pytest.mark.parametrize("name", ALL_OBJECTS)
def test_every_object_is_valid_against_the_newest_schema_strictly(name: str) -> None:
    assert kubernetes_validate.validate(ALL_OBJECTS[name], NEWEST, strict=True) == NEWEST


@pytest.mark.parametrize("name", ALL_OBJECTS)
def test_every_object_passes_the_api_servers_own_checks(name: str) -> None:
    """Names, label keys and values, mounts, ports, quantities: what no schema says."""
    assert semantic_problems(ALL_OBJECTS[name]) == []


@pytest.mark.parametrize("name", [n for n in ALL_OBJECTS if "pod" in n])
def test_pods_pass_the_clients_own_checks(name: str) -> None:
    assert client.V1Pod.model_validate(ALL_OBJECTS[name]).spec.restart_policy == "OnFailure"


def test_an_unknown_field_would_be_caught() -> None:
    pod = new_pod()
    pod["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, NEWEST, strict=True)


# --- names and labels ------------------------------------------------------------------------


def test_a_plain_job_id_names_its_objects_as_is() -> None:
    pod = new_pod("scrape-42")
    assert pod["metadata"]["name"] == "job-scrape-42"
    assert pod["metadata"]["namespace"] == "jm"
    assert pod["metadata"]["labels"] == {"app.kubernetes.io/name": "jobmesh-job",
                                         "app.kubernetes.io/part-of": "jobmesh",
                                         "jobmesh.io/job": "scrape-42"}
    assert o.job_id_of(pod) == "scrape-42"
    assert o.job_selector("scrape-42") == \
        "app.kubernetes.io/name=jobmesh-job,jobmesh.io/job=scrape-42"


@pytest.mark.parametrize("job_id", ["a_b", "a-", "a_", "x" * 59, "y" * 58 + "_", "0-_-_"])
def test_every_job_id_gets_a_valid_name_and_label(job_id: str) -> None:
    assert JOB_ID.fullmatch(job_id)
    name, key = o.object_name(job_id), o.job_key(job_id)
    assert DNS_LABEL.fullmatch(name) and len(name) <= 63
    assert LABEL_VALUE.fullmatch(key) and len(key) <= 63
    assert o.job_id_of(new_pod(job_id)) == job_id  # the exact id, from the annotation


def test_ids_that_differ_only_in_unsafe_characters_get_different_names() -> None:
    assert len({o.object_name(i) for i in ("a_b", "a-b", "a-b_", "a_b_")}) == 4


def test_objects_not_of_ours_have_no_job_id() -> None:
    assert o.job_id_of({"metadata": {"name": "job-x"}}) is None


# --- the pod --------------------------------------------------------------------------------


def test_a_crashed_container_restarts_in_its_pod_and_the_pod_shares_its_processes() -> None:
    spec = new_pod()["spec"]
    assert spec["restartPolicy"] == "OnFailure"  # a crash restarts; a clean exit (pause) not
    assert all("restartPolicy" not in c for c in spec["initContainers"] + spec["containers"])
    assert spec["shareProcessNamespace"] is True
    assert spec["securityContext"] == {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999,
                                       "runAsNonRoot": True}
    assert 0 < spec["terminationGracePeriodSeconds"] <= 120
    assert spec["automountServiceAccountToken"] is False


def test_the_pod_belongs_to_the_jobs_anchor() -> None:
    assert new_pod()["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "job-alpha", "uid": "anchor-uid"}]


def test_every_container_runs_the_image_with_both_volumes() -> None:
    pod = new_pod()
    names = [c["name"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]]
    assert names == ["init", "postgres", "agent"]
    for name in names:
        c = container(pod, name)
        assert c["image"] == SETTINGS.image
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]} == {
            "pgdata": "/var/lib/jobmesh/pgdata", "spool": "/var/lib/jobmesh/spool"}


def test_pgdata_is_an_empty_dir_sized_by_the_jobs_disk() -> None:
    volumes = {v["name"]: v for v in new_pod(disk="50Gi")["spec"]["volumes"]}
    assert volumes["pgdata"]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert volumes["spool"]["emptyDir"] == {}
    default = {v["name"]: v for v in new_pod()["spec"]["volumes"]}
    assert default["pgdata"]["emptyDir"] == {"sizeLimit": "10Gi"}


def test_a_new_job_initialises_with_the_password_from_its_secret() -> None:
    init = container(new_pod(), "init")
    assert init["command"] == [
        "jobmesh", "agent", "init", "--pgdata", "/var/lib/jobmesh/pgdata/data", "--job",
        "alpha", "--spool", "/var/lib/jobmesh/spool", "--archive-timeout", "30",
        "--role-password-env", "JOBMESH_BACKEND_PASSWORD"]
    assert env(init)["JOBMESH_BACKEND_PASSWORD"] == {
        "secretKeyRef": {"name": "job-alpha", "key": "backend-password"}}


def test_a_resumed_job_restores_the_latest_snapshot_from_the_store() -> None:
    init = container(restore_pod(), "init")
    assert init["command"] == [
        "jobmesh", "agent", "restore", "--pgdata", "/var/lib/jobmesh/pgdata/data", "--job",
        "alpha", "--store", "s3://bucket/jobs", "--s3-endpoint", "http://minio:9000",
        "--from", "latest", "--generation", "0"]
    assert "JOBMESH_BACKEND_PASSWORD" not in env(init)


def test_the_restore_and_the_agent_claim_the_incarnations_generation() -> None:
    pod = o.job_pod("alpha", {}, SETTINGS, restore=True, owner_uid="u", generation=7)
    for name in ("init", "agent"):
        command = container(pod, name)["command"]
        assert command[command.index("--generation") + 1] == "7", name


def test_no_password_is_written_into_the_pod() -> None:
    assert "hunter2" not in repr(o.job_pod("alpha", {}, SETTINGS, restore=False,
                                           owner_uid="u"))


def test_postgres_listens_on_the_pod_ip_and_archives_into_the_spool() -> None:
    pg = container(new_pod(archive_timeout=5), "postgres")
    assert pg["command"] == [
        "postgres", "-D", "/var/lib/jobmesh/pgdata/data", "-c", "listen_addresses=$(POD_IP)",
        "-c", "port=5432", "-c", "basic_archive.archive_directory=/var/lib/jobmesh/spool",
        "-c", "archive_timeout=5", "-c", "unix_socket_directories=/var/lib/jobmesh/pgdata"]
    assert env(pg)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # The prober does not expand $(POD_IP) (a fieldRef): the shell reads the variable.
    assert pg["readinessProbe"]["exec"]["command"] == [
        "sh", "-c", 'exec pg_isready -q -h "$POD_IP" -p 5432']


def test_the_agent_serves_on_the_pod_ip_and_ships_to_the_store() -> None:
    agent = container(new_pod(), "agent")
    assert agent["command"] == [
        "jobmesh", "agent", "serve", "--pgdata", "/var/lib/jobmesh/pgdata/data", "--job",
        "alpha", "--store", "s3://bucket/jobs", "--s3-endpoint", "http://minio:9000",
        "--listen", "$(POD_IP):8008", "--spool", "/var/lib/jobmesh/spool",
        "--base-backup-interval", "600", "--wal-window", "5", "--generation", "0",
        "--keep-base-backups", "0"]  # the controller applies retention
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8008}
    # its API wants the job's own token, from the job's Secret (never on the command line)
    assert env(agent)["JOBMESH_AGENT_TOKEN"] == {"secretKeyRef": {"name": "job-alpha",
                                                                  "key": "agent-token"}}
    window = container(new_pod(wal_window=0.5), "agent")["command"]
    at = window.index("--wal-window")
    assert window[at:at + 2] == ["--wal-window", "0.5"]  # the job's own, from its spec


def test_a_bad_wal_window_is_refused() -> None:
    with pytest.raises(ValueError, match="wal_window"):
        new_pod(wal_window=-1)


def test_store_settings_and_s3_credentials_come_from_the_environment_and_a_secret() -> None:
    # PostgreSQL gets them only in a pod that restores (its restore_command fetches WAL):
    # the job's SQL runs there.
    assert set(env(container(new_pod(), "postgres"))) == {"POD_IP"}
    assert env(container(restore_pod(), "postgres"))["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "jobmesh-s3", "key": "AWS_ACCESS_KEY_ID"}}
    for name in ("init", "agent"):
        e = env(container(new_pod(), name))
        assert e["JOBMESH_STORE"] == "s3://bucket/jobs"
        assert e["JOBMESH_S3_ENDPOINT"] == "http://minio:9000"
        assert e["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "jobmesh-s3",
                                                           "key": "AWS_ACCESS_KEY_ID"}}
        assert e["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "jobmesh-s3"
        assert e["AWS_DEFAULT_REGION"]["secretKeyRef"]["optional"] is True
    plain = o.job_pod("a", {}, o.PodSettings("jm", "img", "file:///store"), restore=False,
                      owner_uid="u")
    assert set(env(container(plain, "agent"))) == {"POD_IP", "JOBMESH_STORE", "JOBMESH_AGENT_TOKEN"}


def test_scoped_store_credentials_come_from_the_jobs_own_secret() -> None:
    settings = o.PodSettings("jm", "img", "s3://bucket/jobs", s3_secret="jobmesh-s3",
                             scoped_credentials=True)
    pod = o.job_pod("alpha", {}, settings, restore=True, owner_uid="u")
    for name in ("init", "agent"):
        e = env(container(pod, name))
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert e[key] == {"secretKeyRef": {"name": "job-alpha", "key": key}}
    secret = o.job_secret("jm", "alpha", "pw", "postgresql://x", "u", "token",
                          Credentials("AKID", "SECRET"), "eu-west-1")
    assert o.secret_s3_credentials(secret) == Credentials("AKID", "SECRET")
    assert base64.b64decode(secret["data"]["AWS_DEFAULT_REGION"]) == b"eu-west-1"
    plain = o.job_secret("jm", "alpha", "pw", "postgresql://x", "u", "token")
    assert o.secret_s3_credentials(plain) is None and "AWS_ACCESS_KEY_ID" not in plain["data"]


def test_postgres_resources_come_from_the_job_spec() -> None:
    assert container(new_pod(cpu="2", memory="4Gi"), "postgres")["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


def test_postgres_resources_have_modest_defaults() -> None:
    assert container(new_pod(), "postgres")["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert container(new_pod(memory="256Mi"), "postgres")["resources"]["requests"] == {
        "cpu": "250m", "memory": "256Mi"}


def test_a_bad_archive_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="archive_timeout"):
        new_pod(archive_timeout=-1)


# --- secret, anchor, network policy ------------------------------------------------------------


def test_the_secret_holds_the_password_and_the_url_through_the_router() -> None:
    url = o.connection_url("alpha", "p@ss:/w rd", "jobmesh-router.jm.svc")
    secret = o.job_secret("jm", "alpha", "p@ss:/w rd", url, "anchor-uid", "agent-tok")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"backend-password": "p@ss:/w rd", "url": url, "agent-token": "agent-tok"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "anchor-uid"
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port) == (
        "postgresql", "jobmesh-router.jm.svc", 6432)
    assert unquote(parts.username or "") == "job-alpha"
    assert unquote(parts.password or "") == "p@ss:/w rd"
    assert parts.path == "/job_alpha"


def test_the_anchor_is_a_configmap_named_for_the_job() -> None:
    anchor = o.anchor("jm", "alpha")
    assert (anchor["kind"], anchor["metadata"]["name"]) == ("ConfigMap", "job-alpha")
    assert "ownerReferences" not in anchor["metadata"]


def test_only_the_router_and_the_controller_reach_job_pods() -> None:
    spec = o.network_policy("jm")["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "jobmesh-job"}}
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchExpressions": [
        {"key": "app.kubernetes.io/name", "operator": "In",
         "values": ["jobmesh-router", "jobmesh-controller"]}]}}]
    assert sorted(p["port"] for p in rule["ports"]) == [5432, 8008]
