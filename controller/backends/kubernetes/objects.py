"""The Kubernetes objects of a job, as plain dicts: built here, sent by ``backend.py``.

Pure: no client, no I/O, so every object can be checked against the API's
schema in a unit test. Per job there are four objects, all named
``job-<key>`` (see :func:`job_key`) in the controller's namespace:

- an anchor ConfigMap that lives as long as the job; the pod and the Secret
  name it as their owner, so deleting it deletes the rest (in a real cluster;
  the backend deletes them itself too);
- a Secret holding the job's backend password (the init step gives it to the
  job's roles) and ``url``, the connection URL through the router for the
  job's own workload pods;
- the Pod: init container ``init`` (``agent init`` for a new job, ``agent
  restore`` otherwise), then ``postgres`` and the ``agent`` sidecar sharing
  emptyDirs for PGDATA and the WAL spool. ``restartPolicy: Never``: when any
  container dies the pod fails, the reconciler marks the job failed and
  recovers it from the store into a new pod. Restarting Postgres in place
  would replay from a PGDATA whose spool the dead agent may not have shipped,
  and a restarted agent could not tell; the store is what a job's durability
  rests on, so every failure takes the same, tested path.

One NetworkPolicy for all job pods lets only the router and the controller in.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from jobmesh import jobids
from jobmesh.defaults import ARCHIVE_TIMEOUT, BASE_BACKUP_INTERVAL

from ..job_spec import archive_timeout

Obj = dict[str, Any]

NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"
JOB_LABEL = "jobmesh.io/job"
JOB_ID_ANNOTATION = "jobmesh.io/job-id"  # the exact job id (the label may be a safe form)
JOB_APP = "jobmesh-job"
NETWORK_POLICY = "jobmesh-jobs"
ALLOWED_PEERS = ("jobmesh-router", "jobmesh-controller")

PGDATA_MOUNT = "/var/lib/jobmesh/pgdata"  # also the Unix socket directory
PGDATA = f"{PGDATA_MOUNT}/data"
SPOOL = "/var/lib/jobmesh/spool"
POSTGRES_PORT = 5432
AGENT_PORT = 8008
ROUTER_PORT = 6432
POSTGRES_UID = 999  # the image's postgres user (Dockerfile)

PASSWORD_KEY = "backend-password"
URL_KEY = "url"
PASSWORD_ENV = "JOBMESH_BACKEND_PASSWORD"
# S3 credentials, when a Secret is named for them: its keys are the variables' names.
S3_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

DEFAULT_DISK = "10Gi"
DEFAULT_REQUESTS = {"cpu": "250m", "memory": "512Mi"}
DEFAULT_LIMITS = {"cpu": "1", "memory": "1Gi"}
AGENT_RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"},
                   "limits": {"cpu": "1", "memory": "512Mi"}}

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class PodSettings:
    """What every job pod of one controller shares."""

    namespace: str
    image: str
    store_url: str
    s3_endpoint: str | None = None
    s3_secret: str | None = None  # a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    archive_timeout: int = ARCHIVE_TIMEOUT
    base_backup_interval: float = BASE_BACKUP_INTERVAL
    image_pull_policy: str = "IfNotPresent"
    # The agent's final WAL drain runs in this time when a pod is deleted.
    grace_seconds: int = 60


# --- names ----------------------------------------------------------------------------


def job_key(job_id: str) -> str:
    """The job's part of Kubernetes names and of its label: the id itself when it is a
    valid DNS label, else a safe form with a hash of the id (job ids may hold ``_`` or
    end in ``-``, which names cannot), so two ids never share a key."""
    if _DNS_LABEL.fullmatch(job_id) and len(job_id) <= jobids.MAX_LENGTH:
        return job_id
    safe = job_id.replace("_", "-")[:50].rstrip("-")
    return f"{safe}-{hashlib.sha256(job_id.encode()).hexdigest()[:8]}"


def object_name(job_id: str) -> str:
    """``job-<key>``: the job's pod, Secret and anchor ConfigMap."""
    return f"job-{job_key(job_id)}"


def principal_name(job_id: str) -> str:
    """The catalog user the job's workload logs in as (the Secret's URL names it)."""
    return f"job-{job_id}"


def job_selector(job_id: str | None = None) -> str:
    """A label selector for every job pod, or for one job's."""
    base = f"{NAME_LABEL}={JOB_APP}"
    return base if job_id is None else f"{base},{JOB_LABEL}={job_key(job_id)}"


def job_labels(job_id: str) -> dict[str, str]:
    return {NAME_LABEL: JOB_APP, PART_OF_LABEL: "jobmesh", JOB_LABEL: job_key(job_id)}


def job_id_of(obj: Mapping[str, Any]) -> str | None:
    """The job id an object of ours belongs to (None: not a job object)."""
    meta = obj.get("metadata") or {}
    found = (meta.get("annotations") or {}).get(JOB_ID_ANNOTATION)
    return found if isinstance(found, str) else None


def _metadata(namespace: str, job_id: str, owner_uid: str | None = None) -> Obj:
    meta: Obj = {"name": object_name(job_id), "namespace": namespace,
                 "labels": job_labels(job_id), "annotations": {JOB_ID_ANNOTATION: job_id}}
    if owner_uid is not None:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap",
                                    "name": object_name(job_id), "uid": owner_uid}]
    return meta


# --- the objects ----------------------------------------------------------------------------


def anchor(namespace: str, job_id: str) -> Obj:
    """The ConfigMap the job's other objects belong to (deleting it deletes them)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(namespace, job_id),
            "data": {"job": job_id}}


def connection_url(job_id: str, password: str, router_host: str,
                   router_port: int = ROUTER_PORT) -> str:
    """The job's database through the router, as its principal."""
    user = quote(principal_name(job_id), safe="")
    return (f"postgresql://{user}:{quote(password, safe='')}@{router_host}:{router_port}/"
            f"{quote(f'job_{job_id}', safe='')}")


def agent_url(pod_ip: str | None) -> str:
    """The HTTP API of the agent sidecar in the pod at ``pod_ip``."""
    return f"http://{pod_ip}:{AGENT_PORT}"


def job_secret(namespace: str, job_id: str, password: str, url: str, owner_uid: str) -> Obj:
    """The backend password (for the init step) and the URL (for the job's workload).

    ``data`` (base64) rather than ``stringData``: the object reads back as it was sent.
    """
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(namespace, job_id, owner_uid),
            "data": {PASSWORD_KEY: b64(password), URL_KEY: b64(url)}}


def network_policy(namespace: str) -> Obj:
    """Job pods accept only the router and the controller, on Postgres and the agent."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": NETWORK_POLICY, "namespace": namespace,
                     "labels": {PART_OF_LABEL: "jobmesh"}},
        "spec": {
            "podSelector": {"matchLabels": {NAME_LABEL: JOB_APP}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchExpressions": [
                    {"key": NAME_LABEL, "operator": "In", "values": list(ALLOWED_PEERS)}]}}],
                "ports": [{"protocol": "TCP", "port": POSTGRES_PORT},
                          {"protocol": "TCP", "port": AGENT_PORT}],
            }],
        },
    }


def resources(spec: Mapping[str, Any]) -> Obj:
    """Postgres's requests and limits: the job spec's cpu and memory for both when given
    (the "bad neighbour" fix), else modest defaults."""
    requests = {k: str(spec.get(k) or v) for k, v in DEFAULT_REQUESTS.items()}
    limits = {k: str(spec.get(k) or v) for k, v in DEFAULT_LIMITS.items()}
    return {"requests": requests, "limits": limits}


def job_pod(job_id: str, spec: Mapping[str, Any], settings: PodSettings, *, restore: bool,
            owner_uid: str) -> Obj:
    """The job's pod. ``restore``: start from the store's latest snapshot (resume and
    recovery) rather than from a new cluster (create)."""
    timeout = archive_timeout(spec, settings.archive_timeout)
    store = ["--store", settings.store_url]
    if settings.s3_endpoint:
        store += ["--s3-endpoint", settings.s3_endpoint]
    env = _store_env(settings)
    if restore:
        init_args = ["jobmesh", "agent", "restore", "--pgdata", PGDATA, "--job", job_id,
                     *store, "--from", "latest"]
        init_env = env
    else:
        init_args = ["jobmesh", "agent", "init", "--pgdata", PGDATA, "--job", job_id,
                     "--spool", SPOOL, "--archive-timeout", str(timeout),
                     "--role-password-env", PASSWORD_ENV]
        init_env = [*env, {"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": {
            "name": object_name(job_id), "key": PASSWORD_KEY}}}]
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    mounts = [{"name": "pgdata", "mountPath": PGDATA_MOUNT}, {"name": "spool", "mountPath": SPOOL}]
    common = {"image": settings.image, "imagePullPolicy": settings.image_pull_policy,
              "volumeMounts": mounts, "terminationMessagePolicy": "FallbackToLogsOnError",
              "securityContext": {"allowPrivilegeEscalation": False,
                                  "capabilities": {"drop": ["ALL"]}}}
    postgres = {
        "name": "postgres", **common,
        "command": ["postgres", "-D", PGDATA, "-c", "listen_addresses=$(POD_IP)",
                    "-c", f"port={POSTGRES_PORT}",
                    "-c", f"basic_archive.archive_directory={SPOOL}",
                    "-c", f"archive_timeout={timeout}",
                    "-c", f"unix_socket_directories={PGDATA_MOUNT}"],
        "env": [pod_ip, *env],
        "ports": [{"name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP"}],
        # A shell: an exec probe's command expands $(VAR) only for literal values, not for
        # POD_IP's fieldRef (as Kubernetes' prober does).
        "readinessProbe": {"exec": {"command": [
            "sh", "-c", f'exec pg_isready -q -h "$POD_IP" -p {POSTGRES_PORT}']},
                           "periodSeconds": 2, "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": resources(spec),
    }
    agent = {
        "name": "agent", **common,
        "command": ["jobmesh", "agent", "serve", "--pgdata", PGDATA, "--job", job_id, *store,
                    "--listen", f"$(POD_IP):{AGENT_PORT}", "--spool", SPOOL,
                    "--base-backup-interval", f"{settings.base_backup_interval:g}"],
        "env": [pod_ip, *env],
        "ports": [{"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": AGENT_PORT},
                           "periodSeconds": 2, "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": AGENT_RESOURCES,
    }
    init = {"name": "init", **common, "command": init_args, "env": init_env,
            "resources": resources(spec)}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _metadata(settings.namespace, job_id, owner_uid),
        "spec": {
            "restartPolicy": "Never",
            # The agent stops Postgres (SIGINT to the postmaster) before a pause snapshot.
            "shareProcessNamespace": True,
            "automountServiceAccountToken": False,  # a job pod never talks to the API
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": settings.grace_seconds,
            "securityContext": {"runAsUser": POSTGRES_UID, "runAsGroup": POSTGRES_UID,
                                "fsGroup": POSTGRES_UID, "runAsNonRoot": True},
            "initContainers": [init],
            "containers": [postgres, agent],
            "volumes": [
                {"name": "pgdata",
                 "emptyDir": {"sizeLimit": str(spec.get("disk") or DEFAULT_DISK)}},
                {"name": "spool", "emptyDir": {}},
            ],
        },
    }


def _store_env(settings: PodSettings) -> list[Obj]:
    env: list[Obj] = [{"name": "JOBMESH_STORE", "value": settings.store_url}]
    if settings.s3_endpoint:
        env += [{"name": "JOBMESH_S3_ENDPOINT", "value": settings.s3_endpoint},
                {"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint}]
    if settings.s3_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret,
                                                              "key": key}}}
                for key in S3_CREDENTIAL_KEYS]
        env.append({"name": "AWS_DEFAULT_REGION", "valueFrom": {"secretKeyRef": {
            "name": settings.s3_secret, "key": "AWS_DEFAULT_REGION", "optional": True}}})
    return env


# --- reading a pod's status ----------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """What the backend needs to know of a pod, read from its status."""

    exists: bool
    ready: bool = False
    broken: bool = False  # failed, evicted, being deleted, or a container has died
    ip: str | None = None
    phase: str | None = None
    why: str = ""  # for a broken pod: what happened, for the events and the log
    doing: str = ""  # for a starting pod: what it is doing now

    @property
    def alive(self) -> bool:
        return self.exists and not self.broken


def view(pod: Mapping[str, Any] | None) -> PodView:
    """Read a pod (as the API returns it, in camelCase; None: there is none)."""
    if pod is None:
        return PodView(exists=False, why="the pod is gone")
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase")
    ip = status.get("podIP") or None
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conditions.get("Ready") == "True"
    if meta.get("deletionTimestamp"):
        return PodView(True, broken=True, ip=ip, phase=phase, why="the pod is being deleted")
    if phase in ("Failed", "Succeeded") or status.get("reason") == "Evicted":
        why = status.get("message") or status.get("reason") or f"the pod {phase or 'failed'}"
        detail = _terminated(status.get("initContainerStatuses"), failed_only=True) or \
            _terminated(status.get("containerStatuses"))
        return PodView(True, broken=True, ip=ip, phase=phase,
                       why="; ".join(x for x in (why, detail) if x))
    dead = _terminated(status.get("containerStatuses"))
    if dead:
        return PodView(True, broken=True, ip=ip, phase=phase, why=dead)
    return PodView(True, ready=ready and ip is not None, ip=ip, phase=phase,
                   doing=_doing(status))


def _terminated(statuses: list[Mapping[str, Any]] | None, *, failed_only: bool = False) -> str:
    """'container postgres exited with 1: <message>' for the first container that ended."""
    for cs in statuses or []:
        ended = ((cs.get("state") or {}).get("terminated")
                 or (cs.get("lastState") or {}).get("terminated"))
        if not ended or (failed_only and ended.get("exitCode") == 0):
            continue
        text = f"container {cs.get('name')} exited with {ended.get('exitCode')}"
        if ended.get("reason"):
            text += f" ({ended['reason']})"
        message = " ".join(str(ended.get("message") or "").split())
        return f"{text}: {message[-300:]}" if message else text
    return ""


def _doing(status: Mapping[str, Any]) -> str:
    for cs in status.get("initContainerStatuses") or []:
        if "running" in (cs.get("state") or {}):
            return f"running its {cs.get('name')} step"
    waiting = [cs for cs in status.get("containerStatuses") or []
               if "waiting" in (cs.get("state") or {})]
    if waiting:
        reason = waiting[0]["state"]["waiting"].get("reason") or "waiting"
        return f"container {waiting[0].get('name')}: {reason}"
    return "starting PostgreSQL" if status.get("phase") == "Running" else \
        f"pod {status.get('phase') or 'pending'}"


def agent_running(pod: Mapping[str, Any] | None) -> bool:
    """Could the pod's agent answer (the pod stands, has an IP, its agent has not ended)?
    It may, even when Postgres beside it has stopped (after a pause snapshot)."""
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP") or status.get("phase") in ("Failed", "Succeeded"):
        return False
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == "agent":
            return "running" in (cs.get("state") or {})
    return status.get("phase") == "Running"
