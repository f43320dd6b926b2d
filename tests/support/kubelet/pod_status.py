"""A pod's status as the API server sees it (a PodRun part)."""

from __future__ import annotations

import contextlib

import urllib3
from kubernetes.client.rest import ApiException

from tests.support.k8s_emulator import now

from .container import Container
from .settings import Obj, log


class PodStatus:
    """Status, for PodRun."""

    # --- status ---

    def _condition(self, kind: str, value: bool, reason: str | None = None) -> Obj:
        status = "True" if value else "False"
        if self.transitions.get(kind, ("",))[0] != status:
            self.transitions[kind] = (status, now())
        out = {"type": kind, "status": status, "lastTransitionTime": self.transitions[kind][1]}
        if reason and not value:
            out["reason"] = reason
        return out

    def status(self) -> Obj:
        gate = [c for c in self.containers if c.role != "init"]
        ready = self.phase == "Running" and all(c.ready for c in gate)
        not_ready = "PodCompleted" if self.phase in ("Succeeded", "Failed") else \
            "ContainersNotReady"
        inits = [c.status(self.uid) for c in self.containers if c.role != "main"]
        return {
            "phase": self.phase, "reason": self.reason, "message": self.message,
            "conditions": [
                self._condition("PodScheduled", True),
                self._condition("Initialized", self.initialized, "ContainersNotInitialized"),
                self._condition("ContainersReady", ready, not_ready),
                self._condition("Ready", ready, not_ready),
                *self.extra_conditions],
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}], "startTime": self.start_time,
            **({"initContainerStatuses": inits} if inits else {}),
            "containerStatuses": [c.status(self.uid) for c in self.containers
                                  if c.role == "main"],
        }

    def _publish(self) -> None:
        status = self.status()
        if status == self.published:
            return
        try:
            self.api.patch_namespaced_pod_status(
                self.name, self.namespace, {"metadata": {"uid": self.uid}, "status": status},
                _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):  # gone, or a new pod of the same name
                raise
        except urllib3.exceptions.HTTPError as e:  # the API server is away: try again later
            log.warning("pod %s: cannot write status: %s", self.name, e)
            return
        self.published = status

    def _tail(self, c: Container, lines: int, limit: int) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(c.log_path.read_text(errors="replace").splitlines()[-lines:])[-limit:]
        return ""
