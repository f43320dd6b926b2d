"""Readiness, liveness and startup probes of a pod's containers (a PodRun part)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

from .container import Container, Probe
from .expansion import expand_static, resolve_command
from .settings import Obj, log


class PodProbes:
    """Probing, for PodRun."""

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
