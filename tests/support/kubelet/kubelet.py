"""The test kubelet: watches its namespace's pods and runs each as local processes."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from jobmesh.agent.postgres import PostgresError, bin_dir, pid_alive

from .pod import PodRun
from .processes import descendants
from .settings import WATCH_SECONDS, Obj, RestartBackoff, log

REAL_BACKOFF = RestartBackoff()

# --- the kubelet -----------------------------------------------------------------------------


class Kubelet:
    """Runs the pods of ``namespace`` as local processes; see the module docstring.

    Use it as a context manager (or ``start()``/``stop()``): ``stop()`` kills
    every process it started, whatever state the test left things in.
    ``errors`` collects the kubelet's own failures; a test asserts it is empty.
    """

    def __init__(self, api_url: str, namespace: str, root: Path, *,
                 node_name: str = "test-node", probe_period: float = 0.2,
                 max_grace: float = 5.0, entrypoints: Mapping[str, Sequence[str]] | None = None,
                 image_env: Mapping[str, str] | None = None,
                 restart_backoff: RestartBackoff = REAL_BACKOFF) -> None:
        self.api_url, self.namespace, self.node_name = api_url, namespace, node_name
        self.root = root
        self.probe_period, self.max_grace = probe_period, max_grace
        self.restart_backoff = restart_backoff  # the real kubelet's unless a test shortens it
        self.entrypoints = {k: list(v) for k, v in (entrypoints or {}).items()}
        self.image_env = dict(image_env or {"LANG": "C.UTF-8"})
        if "JOBMESH_PG_BINDIR" in os.environ:  # where this host's "image" keeps Postgres
            self.image_env.setdefault("JOBMESH_PG_BINDIR", os.environ["JOBMESH_PG_BINDIR"])
        try:
            pg_bin = [str(bin_dir())]
        except PostgresError:
            pg_bin = []
        self.search_path = os.pathsep.join(
            [str(Path(sys.executable).parent), *pg_bin,
             "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Kubelet:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the Postgres OS user walks through it to its volumes
        self._thread = threading.Thread(target=self._watch_loop, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, then stop every pod (a short grace, then SIGKILL) without
        touching the API: the pods stay as they are there. Always kills everything."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(WATCH_SECONDS + 10)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.request_termination(min(2.0, self.max_grace), finalize=False)
        for run in runs:
            run.thread.join(self.max_grace + 15)
        for run in runs:  # a run that did not finish in time: no process survives it anyway
            run.kill_now()

    def entrypoint(self, image: str) -> list[str]:
        return self.entrypoints.get(image) or self.entrypoints.get(
            re.split(r"[:@]", image.rsplit("/", 1)[-1])[0], [])

    # --- for tests ---

    def run(self, pod: str) -> PodRun:
        """The latest run of the pod of that name."""
        runs = self.runs(pod)
        if not runs:
            raise LookupError(f"the kubelet never ran a pod {pod}")
        return runs[-1]

    def runs(self, pod: str) -> list[PodRun]:
        """Every run of pods of that name (one per uid), oldest first."""
        with self._lock:
            return [r for r in self._runs.values() if r.name == pod]

    def fail_pod(self, name: str, reason: str = "Evicted",
                 message: str = "The node was low on resource: memory.",
                 timeout: float = 30) -> None:
        """Evict the pod as a node under pressure does: stop its containers (grace period,
        then SIGKILL), phase Failed with ``reason``; the pod object stays until deleted."""
        run = self.run(name)
        run.request_failure(reason, message)
        if not run.failed.wait(timeout):
            raise TimeoutError(f"pod {name} was not failed in {timeout} s")

    def kill_container(self, pod: str, container: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the container's command (as a crash or the OOM killer would)."""
        self.run(pod).container(container).signal(sig)

    def pids(self, pod: str | None = None, container: str | None = None) -> list[int]:
        """Live processes of a pod's containers (of every pod when None): each command,
        what it started, and its shim. Empty once the pod is stopped."""
        with self._lock:
            runs = [r for r in self._runs.values() if pod in (None, r.name)]
        out = []
        for run in runs:
            for c in run.containers:
                proc = c.proc
                if container in (None, c.name) and proc is not None and proc.poll() is None:
                    out += [proc.pid, *descendants(proc.pid)]
        return [p for p in out if pid_alive(p)]

    def log(self, pod: str, container: str) -> str:
        path = self.run(pod).container(container).log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def read_log(self, namespace: str, pod: str, container: str | None) -> str | None:
        """For K8sEmulator.serve_pod_logs: answers ``pods/log``."""
        if namespace != self.namespace:
            return None
        try:
            run = self.run(pod)
        except LookupError:
            return None
        names = [c.name for c in run.containers if c.role == "main"]
        if container is None and len(names) == 1:
            container = names[0]
        return self.log(pod, container) if container else None

    def volume(self, pod: str, name: str) -> Path:
        """The host directory behind one of the pod's volumes."""
        return self.run(pod).volumes[name]

    # --- watching ---

    def _watch_loop(self) -> None:
        with client.ApiClient(client.Configuration(host=self.api_url)) as api_client:
            api = client.CoreV1Api(api_client)
            rv: str | None = None
            while not self._stopping.is_set():
                try:
                    if rv is None:
                        listed = json.loads(api.list_namespaced_pod(
                            self.namespace, _preload_content=False).data)
                        rv = listed["metadata"]["resourceVersion"]
                        self._resync(listed["items"])
                    stream = watch.Watch().stream(api.list_namespaced_pod, self.namespace,
                                                  resource_version=rv,
                                                  timeout_seconds=WATCH_SECONDS)
                    for event in stream:
                        obj = event["raw_object"]
                        rv = obj["metadata"]["resourceVersion"]
                        self._on_event(event["type"], obj)
                        if self._stopping.is_set():
                            break
                except ApiException as e:  # 410 Gone: list again
                    log.info("kubelet: watch ended (%s); listing again", e.status)
                    rv = None
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    log.info("kubelet: API unreachable (%s); listing again", e)
                    rv = None
                    self._stopping.wait(0.2)
                except Exception:
                    self.errors.append(f"kubelet watch: {traceback.format_exc()}")
                    log.exception("kubelet: watch failed")
                    rv = None
                    self._stopping.wait(0.2)

    def _resync(self, pods: list[Obj]) -> None:
        """After a (re-)list: start what is new, and end runs whose pod is gone."""
        present = {p["metadata"]["uid"] for p in pods}
        with self._lock:
            vanished = [r for uid, r in self._runs.items() if uid not in present]
        for run in vanished:
            run.request_termination(run._grace(), finalize=False)
        for pod in pods:
            self._on_event("ADDED", pod)

    def _on_event(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        with self._lock:
            run = self._runs.get(meta["uid"])
            if run is None and kind != "DELETED":
                node = spec.get("nodeName")
                phase = (pod.get("status") or {}).get("phase")
                if node in (None, self.node_name) and phase not in ("Succeeded", "Failed") \
                        and not meta.get("deletionTimestamp") and not self._stopping.is_set():
                    run = self._runs[meta["uid"]] = PodRun(self, pod)
                    run.thread.start()
                return
        if run is None:
            return
        run.pod = pod
        if kind == "DELETED":
            run.request_termination(run._grace(), finalize=False)
        elif meta.get("deletionTimestamp"):
            run.request_termination(float(meta.get("deletionGracePeriodSeconds", 30)),
                                    finalize=True)
