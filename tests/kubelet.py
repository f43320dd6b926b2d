"""A test kubelet: runs the pods of one namespace of the Kubernetes emulator as local processes.

It watches pods with the official client, binds the unscheduled ones to its
node, and runs their containers the way a real kubelet would where our
controller can tell the difference: init containers in order, then every
container; restart policies; readiness, liveness and startup probes; status
(phase, conditions, container states, exit codes, restart counts) written
to the status subresource; graceful deletion with SIGTERM, a grace period,
then SIGKILL; eviction. What a container is made of is simulated:

- Network: each pod gets its own loopback address 127.N.x.y (all of 127/8
  reaches ``lo`` on Linux), so every pod can listen on the same ports (5432,
  8008) on its own pod IP. Bind to the pod IP, never to 0.0.0.0 or
  ``listen_addresses='*'``: those would collide across pods. ``hostNetwork``
  pods get 127.0.0.1. Service names do not resolve: reach pods by pod IP.
- Images are ignored. ``command`` (plus ``args``) is run on this host:
  ``jobmesh`` is ``python -m jobmesh`` of this venv, ``python``/``python3``
  this interpreter, and Postgres binaries (``postgres``, ``initdb``,
  ``pg_ctl``, ``pg_isready``...) come from agent.postgres.bin_dir(), bare or
  by an image path such as /usr/lib/postgresql/16/bin/postgres. A container
  with no command runs ``entrypoints[image]`` when given, else fails to start.
- Filesystem: no chroot and no mount namespace. Volumes are directories under
  ``root`` (emptyDir, Secret and ConfigMap; hostPath is the host path), and a
  container sees them because every occurrence of a ``volumeMounts.mountPath``
  in its command, args, literal env values, workingDir and exec probes is
  rewritten to the volume's directory. Paths that a program computes itself
  (compiled-in defaults) are NOT rewritten: pass every path explicitly,
  including Postgres's ``unix_socket_directories`` (its default,
  /var/run/postgresql, would be shared by every pod on this host).
- Users: ``securityContext.runAsUser`` (pod or container) other than 0 runs
  the container as the Postgres OS user (agent.postgres.os_user(), when we are
  root), and the pod's volumes are handed to that user (as fsGroup would).
  Exception: a Python command that user cannot execute (an interpreter under
  /root) runs as ourselves; ``warnings`` says so.
- Processes: each container runs under a small supervisor (the "shim", the
  container runtime's part): it forwards SIGTERM to the command, adopts every
  process the command leaves behind (it is a child subreaper), and when the
  command exits it kills them all, as the end of a container's cgroup does.
  All pods share the host's pid namespace, so ``shareProcessNamespace: true``
  needs nothing. stdout and stderr go to ``root/logs/<ns>_<pod>_<uid>/<container>.log``.
- Env: literal values, ``$(VAR)`` expansion (command, args and env values, as
  Kubernetes does), ``valueFrom`` fieldRef / secretKeyRef / configMapKeyRef /
  resourceFieldRef, and ``envFrom``. A Secret or ConfigMap that does not exist
  yet keeps the pod Pending (CreateContainerConfigError) until it does.
  Exec probes expand only literal env values, as the real prober does: a
  ``$(POD_IP)`` set by fieldRef becomes the empty string there; use
  ``sh -c '... "$POD_IP"'`` instead.
- Times are shortened for tests: probe periods and initial delays are capped
  at ``probe_period``, grace periods at ``max_grace``, back-offs at 2 s.

Not simulated (the pod fails with reason UnsupportedByTestKubelet, so nothing
passes by accident): volumes other than those above, postStart hooks, gRPC
probes, subPathExpr. Ignored: resources (recorded, never enforced: emptyDir
sizeLimit too), nodeSelector, affinity, tolerations, service account tokens.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import math
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from jobmesh.agent.postgres import PostgresError, bin_dir, os_user, pid_alive
from tests.k8s_emulator import now, parse_quantity

log = logging.getLogger("tests.kubelet")

Obj = dict[str, Any]
TICK = 0.05  # how often a pod's supervisor looks at its processes
MAX_BACKOFF = 2.0
WATCH_SECONDS = 1  # a watch ends this often, so stop() never waits long

# The container runtime's part, run as `python -I -S -c SHIM` with a JSON spec on stdin.
SHIM = r"""
import ctypes, json, os, signal, sys
spec = json.loads(sys.stdin.buffer.read())
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
FORWARD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2}
signal.pthread_sigmask(signal.SIG_BLOCK, FORWARD)
main = os.fork()
if main == 0:
    os.close(spec["ready_fd"])
    try:
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.chdir(spec["cwd"])
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:
        sys.stderr.write(f"kubelet: cannot run {spec['argv'][0]}: {e}\n")
        sys.stderr.flush()
    os._exit(128)
alive = True

def forward(sig, frame):
    # SIGUSR1 means SIGKILL: a signal sent to us for real would kill us, not the command.
    if alive:
        try:
            os.kill(main, signal.SIGKILL if sig == signal.SIGUSR1 else sig)
        except ProcessLookupError:
            pass

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out

for s in FORWARD:
    signal.signal(s, forward)
signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARD)
os.write(spec["ready_fd"], b"%d\n" % main)  # from now on, signals reach the command
os.close(spec["ready_fd"])
status = 0
while True:
    try:
        pid, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == main:
        alive, status = False, st
    if not alive:  # the container ends with its command: nothing it started survives
        for p in descendants():
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


# --- what Kubernetes does to strings (pure; unit-tested) ----------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` is ``$``; an unknown ``$(VAR)`` stays."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            close = text.find(")", i + 2) if nxt == "(" else -1
            if nxt == "$":
                out.append("$")
                i += 2
            elif close != -1:
                name = text[i + 2:close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
            else:
                out.append("$" + nxt)
                i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def expand_static(argv: Sequence[str], env_specs: Sequence[Obj]) -> list[str]:
    """How the kubelet's prober expands an exec probe's command
    (ExpandContainerCommandOnlyStatic): only against literal ``value``s; a
    variable set by ``valueFrom`` reads as the empty string."""
    static = {e["name"]: e.get("value", "") for e in env_specs}
    return [expand(a, static) for a in argv]


def mount_rewriter(mounts: Mapping[str, Path]) -> Callable[[str], str]:
    """Rewrite mount paths in a string to host directories, where they start a path."""
    if not mounts:
        return lambda text: text
    table = {m.rstrip("/") or "/": str(host) for m, host in mounts.items()}
    alternatives = "|".join(re.escape(m) for m in sorted(table, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=[^\w./-])|(?<=://))({alternatives})(?=/|$|[^\w.-])")
    return lambda text: pattern.sub(lambda m: table[m[1]], text)


def resolve_command(argv: Sequence[str], search_path: str) -> list[str]:
    """The host program for a container's argv[0] (images are ignored)."""
    exe, rest = argv[0], list(argv[1:])
    name = Path(exe).name
    if "/" not in exe or not Path(exe).exists():
        if name == "jobmesh":
            return [sys.executable, "-m", "jobmesh", *rest]
        if name in ("python", "python3"):
            return [sys.executable, *rest]
        with contextlib.suppress(PostgresError):
            if (bin_dir() / name).exists():
                return [str(bin_dir() / name), *rest]
    if "/" in exe:
        return [exe, *rest]
    found = shutil.which(exe, path=search_path)
    if found is None:
        raise FileNotFoundError(f'exec: "{exe}": executable file not found in $PATH')
    return [found, *rest]


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc; the shim has its own copy)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                children[int(stat.rpartition(")")[2].split()[1])].append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(pid: int) -> None:
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


# --- pod addresses --------------------------------------------------------------------------

_address_lock = threading.Lock()
_network = random.randrange(16, 240)  # 127.<network>.x.y: unlikely to meet another test run's
_hosts = itertools.count(1)


def take_pod_ip(ports: set[int]) -> str:
    """A loopback address never handed out before in this process, with ``ports`` free."""
    with _address_lock:
        for _ in range(10_000):
            n = next(_hosts)
            ip = f"127.{_network}.{n // 250 % 256}.{n % 250 + 1}"
            if all(_bindable(ip, p) for p in ports):
                return ip
    raise RuntimeError("no free loopback address for a pod")


def _bindable(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


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
    restart_at: float | None = None
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


class PodRun:
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
        policy = self.spec.get("restartPolicy", "Always")
        if c.role == "sidecar":
            again = True
        elif c.role == "init":
            again = c.exit_code != 0 and policy != "Never"
        else:
            again = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
        if again and not self.stopping and self.phase in ("Pending", "Running"):
            c.restart_at = time.monotonic() + min(0.1 * 2 ** c.restarts, MAX_BACKOFF)
            c.last_state = c.state
            c.state = {"waiting": {"reason": "CrashLoopBackOff",
                                   "message": f"back-off restarting failed container {c.name}"}}

    def _restart_due(self) -> None:
        for c in self.containers:
            if c.restart_at is not None and time.monotonic() >= c.restart_at:
                c.restart_at = None
                c.restarts += 1
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

    # --- probes ---

    def _probe_all(self) -> None:
        cap = self.kubelet.probe_period
        for c in self.containers:
            if not c.running:
                continue
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                spec = c.spec.get(kind)
                if spec is None or (kind == "startupProbe") == c.started:
                    continue
                state = c.probes.get(kind)
                if state is None:
                    delay = min(float(spec.get("initialDelaySeconds", 0)), cap)
                    state = c.probes[kind] = Probe(next_at=time.monotonic() + delay)
                if time.monotonic() < state.next_at:
                    continue
                state.next_at = time.monotonic() + min(float(spec.get("periodSeconds", 10)), cap)
                if self._probe(c, spec):
                    state.successes, state.failures = state.successes + 1, 0
                else:
                    state.successes, state.failures = 0, state.failures + 1
                failed = state.failures >= int(spec.get("failureThreshold", 3))
                if kind == "startupProbe":
                    c.started = state.successes > 0
                elif kind == "readinessProbe":
                    if state.successes >= int(spec.get("successThreshold", 1)):
                        c.ready = True
                    elif failed:
                        c.ready = False
                if failed and kind != "readinessProbe":
                    log.info("pod %s: %s failed its %s; killing it", self.name, c.name, kind)
                    c.signal(signal.SIGKILL)
            if "readinessProbe" not in c.spec:
                c.ready = c.started

    def _probe(self, c: Container, spec: Obj) -> bool:
        timeout = min(float(spec.get("timeoutSeconds", 1)), 2.0)
        if "exec" in spec:
            argv = [c.rewrite(a) for a in expand_static(spec["exec"]["command"],
                                                         c.spec.get("env") or [])]
            return self._exec(c, argv, timeout)
        if "httpGet" in spec:
            return self._http_get(c, spec["httpGet"], timeout)
        try:
            tcp = spec["tcpSocket"]
            with socket.create_connection((tcp.get("host") or self.ip, self._port(c, tcp["port"])),
                                          timeout=timeout):
                return True
        except (OSError, ValueError):
            return False

    def _exec(self, c: Container, argv: list[str], timeout: float) -> bool:
        try:
            argv = resolve_command(argv, c.env.get("PATH", os.defpath))
            user = c.user
            done = subprocess.run(argv, env=c.env, cwd=c.cwd, timeout=timeout,
                                  user=user.pw_uid if user else None,
                                  group=user.pw_gid if user else None,
                                  extra_groups=[] if user else None,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def _http_get(self, c: Container, get: Obj, timeout: float) -> bool:
        headers = {"User-Agent": "kube-probe/1.37",
                   **{h["name"]: h["value"] for h in get.get("httpHeaders") or []}}
        # No proxies (a proxy from the environment would swallow 127.x), no TLS verification.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
        try:
            url = f"{get.get('scheme', 'HTTP').lower()}://{get.get('host') or self.ip}:" \
                  f"{self._port(c, get['port'])}{get.get('path', '/')}"
            with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                return 200 <= r.status < 400
        except (OSError, urllib.error.URLError, ValueError):
            return False

    @staticmethod
    def _port(c: Container, port: int | str) -> int:
        if isinstance(port, int) or port.isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"container {c.name} has no port named {port}")

    # --- configuration: volumes, users, env, command ---

    def _configure(self) -> None:
        sources: dict[tuple[str, str], dict[str, bytes] | None] = {}
        owner = self._pod_user()
        for v in self.spec.get("volumes") or []:
            self.volumes[v["name"]] = self._volume(v, owner, sources)
        for c in self.containers:
            self._configure_container(c, sources)

    def _pod_user(self) -> pwd.struct_passwd | None:
        """Who owns the pod's volumes: the Postgres OS user when anything runs as non-root."""
        contexts = [self.spec.get("securityContext") or {}] + [
            c.spec.get("securityContext") or {} for c in self.containers]
        if os.geteuid() == 0 and any(ctx.get("runAsUser") or ctx.get("fsGroup")
                                     for ctx in contexts):
            return pwd.getpwnam(os_user() or "postgres")
        return None

    def _volume(self, v: Obj, owner: pwd.struct_passwd | None,
                sources: dict[tuple[str, str], dict[str, bytes] | None]) -> Path:
        if "hostPath" in v:
            return Path(v["hostPath"]["path"])
        path = self.dir / v["name"]
        path.mkdir(exist_ok=True)
        if "emptyDir" in v:
            path.chmod(0o777)
            if limit := (v["emptyDir"] or {}).get("sizeLimit"):
                self.size_limits[v["name"]] = limit
        else:
            kind, src = ("Secret", v["secret"]) if "secret" in v else ("ConfigMap", v["configMap"])
            data = self._source(kind, src.get("secretName") or src.get("name", ""),
                                bool(src.get("optional")), sources) or {}
            items = [(i["key"], i["path"], i.get("mode")) for i in src.get("items") or []] or \
                [(k, k, None) for k in data]
            for key, rel, mode in items:
                if key not in data:
                    if src.get("optional"):
                        continue
                    raise ConfigError(f"couldn't find key {key} in {kind} {src}")
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[key])
                target.chmod(mode or src.get("defaultMode", 0o644))
            path.chmod(0o755)
        if owner is not None:
            for p in [path, *path.rglob("*")]:
                os.chown(p, owner.pw_uid, owner.pw_gid)
        return path

    def _source(self, kind: str, name: str, optional: bool,
                cache: dict[tuple[str, str], dict[str, bytes] | None]) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's data, decoded; None when optional and absent."""
        if (kind, name) not in cache:
            read = self.api.read_namespaced_secret if kind == "Secret" else \
                self.api.read_namespaced_config_map
            try:
                obj = json.loads(read(name, self.namespace, _preload_content=False).data)
            except ApiException as e:
                if e.status != 404:
                    raise
                if not optional:
                    raise ConfigError(f'{kind.lower()} "{name}" not found') from None
                cache[(kind, name)] = None
                return None
            data = {k: base64.b64decode(v) if kind == "Secret" else v.encode()
                    for k, v in (obj.get("data") or {}).items()}
            data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            cache[(kind, name)] = data
        return cache[(kind, name)]

    def _configure_container(self, c: Container,
                             sources: dict[tuple[str, str], dict[str, bytes] | None]) -> None:
        mounts = {}
        for m in c.spec.get("volumeMounts") or []:
            host = self.volumes[m["name"]] / m.get("subPath", "")
            host.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = host
        c.rewrite = mount_rewriter(mounts)
        ctx = {**(self.spec.get("securityContext") or {}), **(c.spec.get("securityContext") or {})}
        c.user = pwd.getpwnam(os_user() or "postgres") \
            if os.geteuid() == 0 and ctx.get("runAsUser") else None
        home = c.user.pw_dir if c.user else pwd.getpwuid(os.geteuid()).pw_dir
        env = {"PATH": self.kubelet.search_path, "HOSTNAME": self.name, "HOME": home,
               **self.kubelet.image_env}
        for src in c.spec.get("envFrom") or []:
            kind, ref = ("Secret", src["secretRef"]) if "secretRef" in src else \
                ("ConfigMap", src["configMapRef"])
            data = self._source(kind, ref["name"], bool(ref.get("optional")), sources) or {}
            env.update({src.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for e in c.spec.get("env") or []:
            if "valueFrom" in e:
                value = self._value_from(c, e["valueFrom"], sources)
                if value is not None:
                    env[e["name"]] = value
            else:
                env[e["name"]] = expand(c.rewrite(e.get("value", "")), env)
        command = c.spec.get("command") or self.kubelet.entrypoint(c.spec.get("image", ""))
        argv = [expand(c.rewrite(a), env) for a in [*command, *(c.spec.get("args") or [])]]
        c.env, c.cwd = env, c.rewrite(c.spec.get("workingDir") or "/")
        c.start_error = None
        if not command:
            c.start_error = (f"no command, and the test kubelet knows no entrypoint for image "
                             f"{c.spec.get('image')!r} (images are ignored)")
            return
        try:
            c.argv = resolve_command(argv, env["PATH"])
        except FileNotFoundError as e:
            c.start_error = str(e)
            return
        if c.user is not None and c.argv[0] == sys.executable and \
                not _can_execute(c.user, Path(sys.executable)):
            self.kubelet.warnings.append(
                f"pod {self.name} container {c.name}: {c.user.pw_name} cannot execute "
                f"{sys.executable}; running it as {pwd.getpwuid(os.geteuid()).pw_name}")
            c.user = None
            c.env["HOME"] = pwd.getpwuid(os.geteuid()).pw_dir

    def _value_from(self, c: Container, value_from: Obj,
                    sources: dict[tuple[str, str], dict[str, bytes] | None]) -> str | None:
        if "fieldRef" in value_from:
            path = value_from["fieldRef"]["fieldPath"]
            meta = self.pod["metadata"]
            fields = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                      "metadata.uid": self.uid, "spec.nodeName": self.kubelet.node_name,
                      "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                      "status.podIP": self.ip, "status.podIPs": self.ip,
                      "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1"}
            if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                return (meta.get(m[1]) or {}).get(m[2], "")
            if path not in fields:
                raise ConfigError(f"fieldRef {path} is not supported by the test kubelet")
            return fields[path]
        if "resourceFieldRef" in value_from:
            ref = value_from["resourceFieldRef"]
            target = self.container(ref.get("containerName") or c.name)
            kind, _, resource = ref["resource"].partition(".")
            value = ((target.spec.get("resources") or {}).get(kind) or {}).get(resource)
            if value is None:  # no limit: the node's capacity; no request: zero
                value = (os.cpu_count() or 1 if resource == "cpu" else
                         os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) \
                    if kind == "limits" else 0
            return str(math.ceil(parse_quantity(value) / parse_quantity(ref.get("divisor", "1"))))
        kind, ref = ("Secret", value_from["secretKeyRef"]) if "secretKeyRef" in value_from else \
            ("ConfigMap", value_from["configMapKeyRef"])
        data = self._source(kind, ref["name"], bool(ref.get("optional")), sources)
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} "
                              f"{self.namespace}/{ref['name']}")
        return data[ref["key"]].decode()

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
        for c in self.containers:
            c.restart_at = None

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


def _can_execute(user: pwd.struct_passwd, program: Path) -> bool:
    """Can ``user`` execute ``program`` (its real file, and every directory on the way)?"""
    real = program.resolve()
    for path in [*reversed(real.parents), real]:
        try:
            st = path.stat()
        except OSError:
            return False
        bit = 0o100 if st.st_uid == user.pw_uid else 0o010 if st.st_gid == user.pw_gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


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
                 image_env: Mapping[str, str] | None = None) -> None:
        self.api_url, self.namespace, self.node_name = api_url, namespace, node_name
        self.root = root
        self.probe_period, self.max_grace = probe_period, max_grace
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
        with self._lock:
            runs = [r for r in self._runs.values() if r.name == pod]
        if not runs:
            raise LookupError(f"the kubelet never ran a pod {pod}")
        return runs[-1]

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
