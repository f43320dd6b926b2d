"""Per-pod loopback addresses, a range per pytest-xdist worker."""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading

# --- pod addresses --------------------------------------------------------------------------

def _pod_network() -> int:
    """127.<network>.x.y: one network per pytest-xdist worker (gw0 -> 16, gw1 -> 17, ...), so
    parallel workers never hand out the same address; a random one outside those otherwise."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        return 16 + int(worker[2:]) % 100
    return random.randrange(120, 240)


_address_lock = threading.Lock()
_network = _pod_network()
# A random start within the network: another test run on this machine (same worker name)
# starts elsewhere, and _bindable skips what it holds.
_hosts = itertools.count(random.randrange(1, 50_000))


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
