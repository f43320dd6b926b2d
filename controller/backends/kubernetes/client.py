"""The official Kubernetes client, fitted to an asyncio controller.

The client is synchronous: every call here runs in a thread with a timeout,
and objects come back as the API's JSON (camelCase dicts), as ``objects.py``
builds and reads them. :class:`Api` holds the calls the backend makes on one
namespace; :class:`PodWatcher` is a thread that watches all job pods and tells
the reconciler (on its event loop) when one fails, is evicted or vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from jobmesh import errors

from ...core.backend import BackendError
from . import objects as objects
from .pod_status import view

log = logging.getLogger("jobmesh.controller.kubernetes")

Obj = dict[str, Any]

REQUEST_TIMEOUT = 30.0  # one API call
WATCH_SLICE = 2.0  # seconds one watch of a changing pod lasts before we look again
EVENTS_WATCH = 60  # seconds one watch of all job pods lasts (then it is made anew)
GONE_TIMEOUT = 60.0  # seconds past its grace period a deleted pod may take to be gone


def api_client(*, kube_api: str | None = None, kubeconfig: str | None = None) -> client.ApiClient:
    """An explicit API URL (tests), else a kubeconfig file, else the in-cluster service
    account, else the default kubeconfig (~/.kube/config)."""
    if kube_api:
        return client.ApiClient(client.Configuration(host=kube_api.rstrip("/")))
    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
    except (config.ConfigException, OSError) as exc:
        raise BackendError(f"cannot find the Kubernetes API: {exc} (use --kubeconfig, "
                           "--kube-api, or run in a pod)") from exc
    return client.ApiClient(cfg)


def in_cluster_namespace() -> str | None:
    """The namespace of the pod we run in, if we run in one."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def one_line(exc: BaseException) -> str:
    """An error as one line (``jobmesh.errors.one_line``); for the API's, its status and
    the message its body carries."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {errors.one_line(_api_message(exc))}"
    return errors.one_line(exc)


def _api_message(exc: ApiException) -> str:
    message = exc.reason or ""
    if exc.body:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(exc.body).get("message") or message
    return str(message)


def raw(fn: Callable[..., Any], *args: Any, timeout: float = REQUEST_TIMEOUT,
        **kwargs: Any) -> Obj:
    """Call the API, taking its answer as JSON rather than as the client's model objects:
    those are checked strictly (pydantic) on the way in, and would refuse a pod whose
    status lacks a field some kubelet leaves out. Errors still raise ApiException."""
    resp = fn(*args, _request_timeout=timeout, _preload_content=False, **kwargs)
    data = resp.data
    return json.loads(data) if data else {}


class Api:
    """The calls the backend makes in one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str, *,
                 gone_timeout: float = GONE_TIMEOUT) -> None:
        self.client = api
        self.ns = namespace
        self.gone_timeout = gone_timeout  # a deleted pod's grace period, plus this: BackendError
        self.core = client.CoreV1Api(api)
        self.net = client.NetworkingV1Api(api)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Obj:
        """``fn(*args, **kwargs)`` in a thread; its answer as the API's JSON."""
        return await asyncio.to_thread(raw, fn, *args, **kwargs)

    async def read(self, fn: Callable[..., Any], name: str) -> Obj | None:
        """A namespaced object, or None when there is none."""
        try:
            return await self.call(fn, name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, fn: Callable[..., Any], name: str, **kwargs: Any) -> None:
        """Delete a namespaced object; one that is not there is fine."""
        try:
            await self.call(fn, name, self.ns, **kwargs)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- job pods ---------------------------------------------------------------------------

    async def pod(self, job_id: str) -> Obj | None:
        return await self.read(self.core.read_namespaced_pod, objects.object_name(job_id))

    async def job_pods(self) -> list[Obj]:
        found = await self.call(self.core.list_namespaced_pod, self.ns,
                                label_selector=objects.job_selector())
        return list(found.get("items") or [])

    async def pod_change(self, job_id: str, pod: Obj, timeout: float = WATCH_SLICE) -> None:
        """Until the job's pod is no longer ``pod`` (a watch from its resourceVersion), or
        ``timeout``. Events of the version we have are skipped: a watch may begin by
        replaying the current state."""
        rv = (pod.get("metadata") or {}).get("resourceVersion")

        def wait() -> None:
            w = watch.Watch()
            kwargs: dict[str, Any] = {"label_selector": objects.job_selector(job_id),
                                      "timeout_seconds": max(1, round(timeout)),
                                      "_request_timeout": timeout + 10, "deserialize": False}
            if rv:
                kwargs["resource_version"] = rv
            for event in w.stream(self.core.list_namespaced_pod, self.ns, **kwargs):
                obj = event.get("object") or {}
                if (obj.get("metadata") or {}).get("resourceVersion") != rv:
                    w.stop()
                    return

        try:
            await asyncio.to_thread(wait)
        except Exception as exc:  # an expired or broken watch: the caller reads again
            log.debug("watching the pod of job %s: %s", job_id, one_line(exc))
            await asyncio.sleep(0.2)

    async def delete_pod(self, job_id: str, grace: int) -> None:
        """Delete the job's pod and wait until the API no longer has it (a new pod of the
        same name, made after it, is not waited for): the fence before any new pod of the
        job. A pod whose kubelet never confirms the delete (its node is unreachable) holds
        it for ``grace`` + ``gone_timeout`` seconds, then BackendError: every process of
        it may still run and write to the job's store prefix, so nothing replaces it."""
        name = objects.object_name(job_id)
        pod = await self.pod(job_id)
        if pod is None:
            return
        uid = pod["metadata"].get("uid")
        await self.delete(self.core.delete_namespaced_pod, name, grace_period_seconds=grace)
        waited = grace + self.gone_timeout
        deadline = time.monotonic() + waited
        while True:
            pod = await self.pod(job_id)
            if pod is None or pod["metadata"].get("uid") != uid:
                return
            if time.monotonic() > deadline:
                node = (pod.get("spec") or {}).get("nodeName") or "its node"
                raise BackendError(
                    f"pod {name} is still there {waited:g} s after it was deleted ({node} "
                    f"has not confirmed its containers stopped): no new pod of job {job_id} "
                    f"is started until it is gone; if {node} is down for good, "
                    f"`kubectl delete pod {name} --force` ends the wait")
            left = max(deadline - time.monotonic(), 0.1)
            await self.pod_change(job_id, pod, min(WATCH_SLICE, left))


class PodWatcher:
    """A thread watching all job pods: ``on_change(job_id)`` (on the event loop) when one
    fails, is evicted, is being deleted or vanishes."""

    def __init__(self, api: client.ApiClient, namespace: str, loop: asyncio.AbstractEventLoop,
                 on_change: Callable[[str], None]) -> None:
        self.core = client.CoreV1Api(api)
        self.ns = namespace
        self.loop = loop
        self.on_change = on_change
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._told: set[str] = set()  # pod uids already reported broken
        self._thread = threading.Thread(target=self._run, name="job-pod-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Does not wait: the (daemon) thread ends with its current watch."""
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._watch = watch.Watch()
            try:
                for event in self._watch.stream(
                        self.core.list_namespaced_pod, self.ns,
                        label_selector=objects.job_selector(), timeout_seconds=EVENTS_WATCH,
                        _request_timeout=EVENTS_WATCH + 10, deserialize=False):
                    if self._stop.is_set():
                        return
                    self._seen(event.get("type"), event.get("object") or {})
            except Exception as exc:  # the API is away: look again shortly
                log.debug("watching job pods: %s", one_line(exc))
                self._stop.wait(1.0)

    def _seen(self, kind: str | None, pod: Obj) -> None:
        job_id = objects.job_id_of(pod)
        if job_id is None:
            return
        uid = str((pod.get("metadata") or {}).get("uid"))
        if kind == "DELETED":
            self._told.discard(uid)
        elif uid in self._told or not view(pod).broken:
            return
        else:
            self._told.add(uid)
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            self.loop.call_soon_threadsafe(self.on_change, job_id)
