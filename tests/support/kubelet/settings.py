"""Types, timings and the logger shared by the test kubelet's modules."""

from __future__ import annotations

import logging
from typing import Any

Obj = dict[str, Any]
TICK = 0.05  # how often a pod's supervisor looks at its processes
MAX_BACKOFF = 2.0
WATCH_SECONDS = 1  # a watch ends this often, so stop() never waits long

log = logging.getLogger("tests.kubelet")
