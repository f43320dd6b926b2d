"""One container of a pod: its process, state and probes' counters."""

from __future__ import annotations

import contextlib
import pwd
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .processes import kill_tree
from .settings import Obj

# --- one container ---------------------------------------------------------------------------


class ConfigError(Exception):
    """What keeps a container from being created yet (a Secret that is not there...)."""


@dataclass
class Probe:
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0


@dataclass
class Container:
    spec: Obj
    role: str  # "init", "sidecar" (an init container with restartPolicy Always) or "main"
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: pwd.struct_passwd | None = None
    cwd: str = "/"
    rewrite: Callable[[str], str] = lambda text: text
    start_error: str | None = None
    restarts: int = 0
    restart_at: float | None = None  # when the kubelet starts it again (None: it will not)
    backoff: float | None = None  # the next back-off (None: no crash since a reset)
    backoff_at: float = 0.0  # when the back-off last grew (monotonic)
    ended: Obj = field(default_factory=dict)  # the run that ended, until it is restarted
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "PodInitializing"}})
    last_state: Obj = field(default_factory=dict)
    exit_code: int | None = None
    started_at: str = ""
    started: bool = False
    ready: bool = False
    probes: dict[str, Probe] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def done(self) -> bool:
        """Exited and not coming back."""
        return self.proc is None and self.restart_at is None and "terminated" in self.state

    def status(self, pod_uid: str) -> Obj:
        image = self.spec.get("image", "")
        out = {"name": self.name, "image": image, "imageID": f"sim://{image}",
               "ready": self.ready, "started": self.started, "restartCount": self.restarts,
               "state": self.state, "lastState": self.last_state}
        if "waiting" not in self.state:
            out["containerID"] = f"sim://{pod_uid[:8]}-{self.name}-{self.restarts}"
        return out

    def signal(self, sig: int) -> None:
        """Signal the command (through its shim; SIGKILL is the shim's SIGUSR1)."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGUSR1 if sig == signal.SIGKILL else sig)

    def kill_now(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


# --- one pod ---------------------------------------------------------------------------------

SUPPORTED_VOLUMES = ("emptyDir", "secret", "configMap", "hostPath")


def unsupported(spec: Obj) -> list[str]:
    """What this kubelet cannot do, so a pod using it fails loudly instead of passing."""
    out = []
    for v in spec.get("volumes") or []:
        if not any(k in v for k in SUPPORTED_VOLUMES):
            out.append(f"volume {v.get('name')}: only {', '.join(SUPPORTED_VOLUMES)}")
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if (c.get("lifecycle") or {}).get("postStart"):
            out.append(f"container {c['name']}: postStart hooks")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "grpc" in (c.get(probe) or {}):
                out.append(f"container {c['name']}: gRPC probes")
        if any("subPathExpr" in m for m in c.get("volumeMounts") or []):
            out.append(f"container {c['name']}: subPathExpr")
    return out
