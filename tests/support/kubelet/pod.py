"""One pod run from binding to the end, in its own thread."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.support.k8s_emulator import now

from .addresses import take_pod_ip
from .container import ConfigError, Container, unsupported
from .pod_config import PodConfig
from .pod_status import PodStatus
from .probes import PodProbes
from .processes import kill_tree
from .settings import TICK, Obj, log
from .shim import SHIM
from .stopping import PodStopping

if TYPE_CHECKING:  # (the kubelet imports this module)
    from .kubelet import Kubelet


class PodRun(PodProbes, PodConfig, PodStopping, PodStatus):
    """Runs one pod (one uid) from binding to the end, in its own thread."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        meta = pod["metadata"]
        self.thread = threading.Thread(target=self._main, name=f"pod-{meta['name']}",
                                       daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.spec: Obj = pod["spec"]
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta["namespace"]
        self.dir = kubelet.root / "pods" / self.uid[:8]
        self.log_dir = kubelet.root / "logs" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.ip = ""
        self.volumes: dict[str, Path] = {}
        self.size_limits: dict[str, str] = {}
        self.containers = [
            Container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init",
                      self.log_dir / f"{c['name']}.log")
            for c in self.spec.get("initContainers") or []
        ] + [Container(c, "main", self.log_dir / f"{c['name']}.log")
             for c in self.spec["containers"]]
        self.phase, self.reason, self.message = "Pending", None, None
        self.configured = self.initialized = self.stopping = False
        self.configure_at = 0.0
        self.start_time = now()
        self.transitions: dict[str, tuple[str, str]] = {}
        self.extra_conditions: list[Obj] = []
        self.published: Obj | None = None
        self.wake = threading.Event()
        self.termination: tuple[float, bool] | None = None  # (grace seconds, finalize the delete)
        self.failure: tuple[str, str] | None = None
        self.failed = threading.Event()
        self.api: client.CoreV1Api

    # --- requests from other threads ---

    def request_termination(self, grace: float, finalize: bool) -> None:
        before = self.termination
        self.termination = (grace if before is None else min(grace, before[0]),
                            finalize or (before is not None and before[1]))
        self.wake.set()

    def request_failure(self, reason: str, message: str) -> None:
        self.failure = (reason, message)
        self.wake.set()

    def container(self, name: str) -> Container:
        for c in self.containers:
            if c.name == name:
                return c
        raise LookupError(f"pod {self.name} has no container {name}")

    def kill_now(self) -> None:
        for c in self.containers:
            c.kill_now()

    # --- the thread ---

    def _main(self) -> None:
        api_client = client.ApiClient(client.Configuration(host=self.kubelet.api_url))
        self.api = client.CoreV1Api(api_client)
        try:
            self._run()
        except Exception:
            self.kubelet.errors.append(f"pod {self.namespace}/{self.name}: "
                                       f"{traceback.format_exc()}")
            log.exception("pod %s/%s: the kubelet failed", self.namespace, self.name)
        finally:
            self.kill_now()
            shutil.rmtree(self.dir, ignore_errors=True)
            api_client.close()
            self.failed.set()

    def _run(self) -> None:
        if not self._bind():
            return
        ports = {5432, 6432, 8008, 8080} | {
            p["containerPort"] for c in self.containers for p in c.spec.get("ports") or []}
        self.ip = "127.0.0.1" if self.spec.get("hostNetwork") else take_pod_ip(ports)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log.info("pod %s/%s: bound, IP %s", self.namespace, self.name, self.ip)
        if problems := unsupported(self.spec):
            self.phase, self.reason = "Failed", "UnsupportedByTestKubelet"
            self.message = "; ".join(problems)
        while True:
            if self.termination is not None:
                self._terminate(*self.termination)
                return
            if self.failure is not None and not self.failed.is_set():
                self._evict(*self.failure)
            if self.phase in ("Pending", "Running"):
                self._step()
            self._publish()
            self.wake.wait(TICK)
            self.wake.clear()

    def _bind(self) -> bool:
        node = self.spec.get("nodeName")
        if node:
            return node == self.kubelet.node_name
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": self.name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.kubelet.node_name}}
        try:
            self.api.create_namespaced_pod_binding(self.name, self.namespace, body,
                                                   _preload_content=False)
        except ApiException as e:
            if e.status in (404, 409):
                return False  # gone, or bound elsewhere
            raise
        return True

    # --- running ---

    def _step(self) -> None:
        if not self.configured:
            if time.monotonic() < self.configure_at:
                return
            try:
                self._configure()
                self.configured = True
            except ConfigError as e:  # try again soon: the Secret may be on its way
                self.configure_at = time.monotonic() + self.kubelet.probe_period
                for c in self.containers:
                    c.state = {"waiting": {"reason": "CreateContainerConfigError",
                                           "message": str(e)}}
                return
        self._reap()
        self._restart_due()
        self._advance()
        self._probe_all()
        self._update_phase()

    def _advance(self) -> None:
        """Init containers in order (a sidecar only needs to have started), then the rest."""
        if self.initialized:
            return
        for c in self.containers:
            if c.role == "main":
                break
            if c.role == "sidecar":
                if c.proc is None and c.restart_at is None and "running" not in c.state:
                    self._start(c)
                if not c.started:
                    return
                continue
            if c.exit_code == 0 and c.done:
                continue
            if c.proc is None and c.restart_at is None and "terminated" not in c.state:
                self._start(c)
            return
        self.initialized = True
        for c in self.containers:
            if c.role == "main":
                self._start(c)

    def _start(self, c: Container) -> None:
        c.probes = {}
        c.ready = c.started = False
        c.started_at = now()
        if c.start_error is not None:
            c.state = {"terminated": {"exitCode": 128, "reason": "StartError",
                                      "message": c.start_error, "startedAt": c.started_at,
                                      "finishedAt": c.started_at}}
            c.exit_code = 128
            self._after_exit(c)
            return
        ready_r, ready_w = os.pipe()
        spec = {"argv": c.argv, "env": c.env, "cwd": c.cwd, "ready_fd": ready_w,
                "uid": c.user.pw_uid if c.user else None, "gid": c.user.pw_gid if c.user else None}
        try:
            with c.log_path.open("ab") as out:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", SHIM],
                                        stdin=subprocess.PIPE, stdout=out, stderr=out, cwd="/",
                                        pass_fds=(ready_w,), start_new_session=True,
                                        env={"PATH": os.defpath})
        finally:
            os.close(ready_w)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        # Until the shim has its signal handlers, a signal would kill it instead.
        with os.fdopen(ready_r, "rb") as ready:
            if not select.select([ready], [], [], 30)[0] or not ready.readline():
                kill_tree(proc.pid)
        c.proc = proc
        c.state = {"running": {"startedAt": c.started_at}}
        c.started = "startupProbe" not in c.spec
        log.info("pod %s: started %s: %s", self.name, c.name, " ".join(c.argv))

    def _reap(self) -> None:
        for c in self.containers:
            if c.proc is None or c.proc.poll() is None:
                continue
            code = c.proc.returncode
            c.proc = None
            c.exit_code = code if code >= 0 else 128 - code  # the shim itself was killed
            c.ready = c.started = False
            terminated = {"exitCode": c.exit_code,
                          "reason": "Completed" if c.exit_code == 0 else "Error",
                          "startedAt": c.started_at, "finishedAt": now(),
                          "containerID": f"sim://{self.uid[:8]}-{c.name}-{c.restarts}"}
            if c.exit_code and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                terminated["message"] = self._tail(c, 80, 2048)
            c.state = {"terminated": terminated}
            log.info("pod %s: %s exited with %s", self.name, c.name, c.exit_code)
            self._after_exit(c)

    def _after_exit(self, c: Container) -> None:
        """Restart ``c`` when the pod's policy says so, after the crash-loop back-off."""
        policy = self.spec.get("restartPolicy", "Always")
        if c.role == "sidecar":
            again = True
        elif c.role == "init":
            again = c.exit_code != 0 and policy != "Never"
        else:
            again = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
        if not again or self.stopping or self.phase not in ("Pending", "Running"):
            return
        b = self.kubelet.restart_backoff
        now_ = time.monotonic()
        if c.backoff is None or now_ - c.backoff_at > b.reset_after:
            delay, c.backoff = 0.0, b.initial  # the first crash (since a reset): at once
        else:
            delay, c.backoff = c.backoff, min(c.backoff * 2, b.cap)
        c.backoff_at = now_ + delay
        c.restart_at = now_ + delay
        c.ended = c.state
        if delay > 0:  # (an immediate restart shows the terminated state until it runs)
            c.last_state = c.state
            c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                f"back-off {_go_duration(delay)} restarting failed container={c.name} "
                f"pod={self.name}_{self.namespace}({self.uid})")}}

    def _restart_due(self) -> None:
        for c in self.containers:
            if c.restart_at is not None and time.monotonic() >= c.restart_at:
                c.restart_at = None
                c.restarts += 1
                c.last_state, c.ended = c.ended, {}
                self._start(c)

    def _update_phase(self) -> None:
        inits = [c for c in self.containers if c.role == "init"]
        mains = [c for c in self.containers if c.role == "main"]
        if any(c.done and c.exit_code != 0 for c in inits):
            self.phase = "Failed"
        elif not self.initialized:
            self.phase = "Pending"
        elif all(c.done for c in mains):
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed"
        else:
            self.phase = "Running"
        if self.phase in ("Succeeded", "Failed"):  # sidecars end with the pod's work
            sidecars = [c for c in self.containers if c.role == "sidecar"]
            self._stop_containers(sidecars, time.monotonic() + self._grace())


def _go_duration(seconds: float) -> str:
    """As Go prints a time.Duration in the kubelet's messages: 10s, 1m20s, 5m0s."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:g}s" if seconds < 1 else f"{whole}s"
    return f"{whole // 60}m{whole % 60}s"
