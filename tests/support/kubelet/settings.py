"""Types, timings and the logger shared by the test kubelet's modules."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
TICK = 0.05  # how often a pod's supervisor looks at its processes
WATCH_SECONDS = 1  # a watch ends this often, so stop() never waits long

log = logging.getLogger("tests.kubelet")


@dataclass(frozen=True)
class RestartBackoff:
    """The kubelet's crash-loop back-off between restarts of one container.

    As the real kubelet (``flowcontrol.Backoff`` keyed by container, pod
    lifecycle docs "Container restarts"): the first restart is immediate; each
    later one waits ``initial`` seconds after the container ended, doubling
    (10 s, 20 s, 40 s ...) up to ``cap`` (300 s); a container that ran
    ``reset_after`` seconds (10 min) since its last restart starts over as if
    it had never crashed. ``Kubelet(restart_backoff=RestartBackoff.shortened())``
    shrinks every figure for tests that need several restarts.
    """

    initial: float = 10.0
    cap: float = 300.0
    reset_after: float = 600.0

    @classmethod
    def shortened(cls, initial: float = 0.2, cap: float = 1.0,
                  reset_after: float = 60.0) -> RestartBackoff:
        return cls(initial, cap, reset_after)
