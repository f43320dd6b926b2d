"""The Kubernetes objects of a job, as plain dicts: built here, sent by ``backend.py``.

Pure: no client, no I/O, so every object can be checked against the API's
schema in a unit test (reading a pod's status back is ``pod_status.py``). Per
job there are four objects, all named ``job-<key>`` (see :func:`job_key`) in
the controller's namespace:

- an anchor ConfigMap that lives as long as the job; the pod and the Secret
  name it as their owner, so deleting it deletes the rest (in a real cluster;
  the backend deletes them itself too);
- a Secret holding the job's backend password (the init step gives it to the
  job's roles) and ``url``, the connection URL through the router for the
  job's own workload pods;
- the Pod: init container ``init`` (``agent init`` for a new job, ``agent
  restore`` otherwise), then ``postgres`` and the ``agent`` sidecar sharing
  emptyDirs for PGDATA and the WAL spool.

The pod runs under ``restartPolicy: OnFailure``. A container that dies with a
non-zero status (a crash, kill -9, the OOM killer) is restarted by the
kubelet in the same pod, on the same emptyDirs and pod IP: PostgreSQL's own
crash recovery replays its local WAL, so no acknowledged commit is lost and
nothing is downloaded; the agent beside it keeps running (it reads
``postmaster.pid`` afresh for every request) and ships what the restarted
server archives into the spool, which a dead agent would have left there for
a restarted one. A clean exit is not restarted: when the agent stops
Postgres with a fast shutdown for a pause snapshot (exit 0), nothing starts
it again against the pause, and the backend deletes the pod once the
snapshot is stored. Only a lost pod (deleted, evicted, its node gone, or
Postgres crash-looping, see ``pod_status.py``) is replaced, and only then is
the job restored from the store into a new pod.

The pod-level policy covers init containers too: under OnFailure the kubelet
would run a failing ``agent init``/``agent restore`` again and again, so the
backend reads an init failure as the end of that pod (it deletes it and
reports the failure at once, as under ``Never``). An init step also runs
again when the kubelet recreates the pod's sandbox (after a node reboot, for
one) on the same emptyDirs; ``agent init`` and ``agent restore`` refuse a
non-empty PGDATA, so such a pod is read as failed and the job is restored
from the store (a known gap: an init step that knew its earlier run had
completed could let it recover in place).
(Kubernetes 1.34+ also has per-container restart rules, which could restart
Postgres alone and leave init containers under ``Never``; they sit behind
the ContainerRestartRules feature gate, so this relies on the pod-level
policy every cluster has.)

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
from jobmesh.agent.apitoken import TOKEN_ENV
from jobmesh.defaults import ARCHIVE_TIMEOUT, BASE_BACKUP_INTERVAL, JOB_CPU, JOB_MEMORY, WAL_WINDOW

from ...storage.access import Credentials
from ..job_spec import archive_timeout, wal_window

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
AGENT_TOKEN_KEY = "agent-token"  # the sidecar's API token, as $JOBMESH_AGENT_TOKEN
URL_KEY = "url"
PASSWORD_ENV = "JOBMESH_BACKEND_PASSWORD"
# S3 credentials, when a Secret is named for them: its keys are the variables' names.
S3_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

DEFAULT_DISK = "10Gi"
DEFAULT_REQUESTS = {"cpu": "250m", "memory": "512Mi"}
DEFAULT_LIMITS = {"cpu": JOB_CPU, "memory": JOB_MEMORY}  # as the local backend's cgroups
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
    # The job's own Secret holds its sidecar's store credentials (controller/storage/access).
    scoped_credentials: bool = False
    archive_timeout: int = ARCHIVE_TIMEOUT
    wal_window: float = WAL_WINDOW  # the agent streams unfinished WAL this often (0: never)
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


def job_secret(namespace: str, job_id: str, password: str, url: str, owner_uid: str,
               agent_token: str, s3: Credentials | None = None, region: str | None = None
               ) -> Obj:
    """The backend password (for the init step), the URL (for the job's workload), the
    agent's API token (for the sidecar: ``jobmesh.agent.apitoken``) and, with scoped
    store credentials, the sidecar's own (``controller/storage/access.py``).

    ``data`` (base64) rather than ``stringData``: the object reads back as it was sent.
    """
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    data = {PASSWORD_KEY: b64(password), URL_KEY: b64(url), AGENT_TOKEN_KEY: b64(agent_token)}
    if s3 is not None:
        data |= {"AWS_ACCESS_KEY_ID": b64(s3.access_key_id),
                 "AWS_SECRET_ACCESS_KEY": b64(s3.secret_access_key),
                 "AWS_DEFAULT_REGION": b64(region or "us-east-1")}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _metadata(namespace, job_id, owner_uid), "data": data}


def secret_s3_credentials(secret: Obj | None) -> Credentials | None:
    """The store credentials a job's Secret holds (None: none, or not both keys)."""
    data = (secret or {}).get("data") or {}
    try:
        key, value = (base64.b64decode(data[k]).decode() for k in S3_CREDENTIAL_KEYS)
    except (KeyError, ValueError, TypeError):
        return None
    return Credentials(key, value) if key and value else None


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
            owner_uid: str, generation: int = 0) -> Obj:
    """The job's pod. ``restore``: start from the store's latest snapshot (resume and
    recovery) rather than from a new cluster (create). ``generation``: the incarnation's,
    claimed in the store by the restore and the agent (``agent/fence.py``)."""
    timeout = archive_timeout(spec, settings.archive_timeout)
    window = wal_window(spec, settings.wal_window)
    store = ["--store", settings.store_url]
    if settings.s3_endpoint:
        store += ["--s3-endpoint", settings.s3_endpoint]
    env = _store_env(settings, job_id)
    if restore:
        init_args = ["jobmesh", "agent", "restore", "--pgdata", PGDATA, "--job", job_id,
                     *store, "--from", "latest", "--generation", str(generation)]
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
        # Store credentials only in a pod that restores: its restore_command (agent
        # wal-fetch) reads the archived WAL; a new cluster's PostgreSQL needs none.
        "env": [pod_ip, *env] if restore else [pod_ip],
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
                    "--base-backup-interval", f"{settings.base_backup_interval:g}",
                    "--wal-window", f"{window:g}", "--generation", str(generation),
                    "--keep-base-backups", "0"],
        "env": [pod_ip, *env, {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {
            "name": object_name(job_id), "key": AGENT_TOKEN_KEY}}}],
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
            # A crashed container restarts in place; a clean exit (a pause) does not.
            "restartPolicy": "OnFailure",
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


def _store_env(settings: PodSettings, job_id: str) -> list[Obj]:
    env: list[Obj] = [{"name": "JOBMESH_STORE", "value": settings.store_url}]
    if settings.s3_endpoint:
        env += [{"name": "JOBMESH_S3_ENDPOINT", "value": settings.s3_endpoint},
                {"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint}]
    # Scoped: the job's own Secret, whose user may touch only this job's prefix.
    secret = object_name(job_id) if settings.scoped_credentials else settings.s3_secret
    if secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for key in S3_CREDENTIAL_KEYS]
        env.append({"name": "AWS_DEFAULT_REGION", "valueFrom": {"secretKeyRef": {
            "name": secret, "key": "AWS_DEFAULT_REGION", "optional": True}}})
    return env
