"""Stopping a pod: grace periods, preStop hooks, eviction (a PodRun part)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time

import urllib3
from kubernetes.client.rest import ApiException

from tests.support.k8s_emulator import now

from .container import Container
from .settings import log


class PodStopping:
    """Stopping, for PodRun."""

    # --- stopping ---

    def _grace(self, seconds: float | None = None) -> float:
        if seconds is None:
            seconds = float(self.spec.get("terminationGracePeriodSeconds", 30))
        return min(seconds, self.kubelet.max_grace)

    def _stop_containers(self, containers: list[Container], deadline: float) -> None:
        """preStop hooks, SIGTERM, and SIGKILL for what still runs at the deadline."""
        running = [c for c in containers if c.running]
        for c in running:
            self._pre_stop(c, deadline)
            c.signal(signal.SIGTERM)
        for c in running:
            assert c.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            c.signal(signal.SIGKILL)
            try:
                c.proc.wait(5)
            except subprocess.TimeoutExpired:  # the shim itself is stuck
                c.kill_now()
        self._reap()

    def _pre_stop(self, c: Container, deadline: float) -> None:
        hook = (c.spec.get("lifecycle") or {}).get("preStop")
        timeout = max(0.0, deadline - time.monotonic())
        if not hook or timeout == 0:
            return
        if "exec" in hook:  # hooks get no $(VAR) expansion at all
            self._exec(c, [c.rewrite(a) for a in hook["exec"]["command"]], timeout)
        elif "httpGet" in hook:
            self._http_get(c, hook["httpGet"], min(timeout, 2.0))
        elif "sleep" in hook:
            time.sleep(min(float(hook["sleep"]["seconds"]), timeout))

    def _stop_everything(self, grace: float) -> None:
        self.stopping = True
        deadline = time.monotonic() + grace
        self._stop_containers([c for c in self.containers if c.role != "sidecar"], deadline)
        sidecars = [c for c in self.containers if c.role == "sidecar"]  # they go last
        self._stop_containers(sidecars, max(deadline, time.monotonic() + min(1.0, grace)))
        for c in self.containers:  # a container waiting for its restart is not coming back
            if c.restart_at is not None:
                c.restart_at, c.state = None, c.ended or c.state

    def _evict(self, reason: str, message: str) -> None:
        self._stop_everything(self._grace())
        self.phase, self.reason, self.message = "Failed", reason, message
        self.extra_conditions = [{"type": "DisruptionTarget", "status": "True",
                                  "reason": "TerminationByKubelet", "message": message,
                                  "lastTransitionTime": now()}]
        self._publish()
        self.failed.set()

    def _terminate(self, grace: float, finalize: bool) -> None:
        """The pod is being deleted: stop it, and when it was only marked, finish the delete."""
        self._stop_everything(self._grace(grace))
        if self.phase in ("Pending", "Running"):
            ran = [c for c in self.containers if c.role == "main" and c.exit_code is not None]
            self.phase = "Succeeded" if ran and all(c.exit_code == 0 for c in ran) else "Failed"
        shutil.rmtree(self.dir, ignore_errors=True)
        if finalize:
            self._publish()
            # 404: gone already; 409: another pod of that name by now
            with contextlib.suppress(ApiException, urllib3.exceptions.HTTPError):
                self.api.delete_namespaced_pod(
                    self.name, self.namespace, grace_period_seconds=0,
                    body={"preconditions": {"uid": self.uid}}, _preload_content=False)
        log.info("pod %s/%s: stopped", self.namespace, self.name)
