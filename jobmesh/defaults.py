"""Every default that more than one module needs, in one place.

A leaf module (it imports nothing of jobmesh), so the router, the agent and
the controller read the same numbers. Flags' help texts format these values
rather than repeating them.
"""

from __future__ import annotations

import os
from pathlib import Path

# Durability: the agent streams a running job's unfinished WAL segment to the
# store every this many seconds (what a lost machine may lose, plus the upload), s.
WAL_WINDOW = 5.0
# Job starts (create, resume, recover) and stops (pause, end) a controller runs at once.
MAX_STARTING = 8
MAX_STOPPING = 4
# A local job's cgroup limits when its spec sets none (as the Kubernetes pod limits).
JOB_CPU = "1"
JOB_MEMORY = "1Gi"
KEEP_PAUSES = 3  # pause snapshots each job keeps
KEEP_BASE_BACKUPS = 2  # a standalone agent's own retention (under a controller: its retention)
PITR_WINDOW = 24 * 3600.0  # seconds a point-in-time restore or fork can reach back
GC_INTERVAL = 3600.0  # seconds between store-wide garbage collections
# PostgreSQL's archive_timeout (s): with streaming, only a safety net for when the
# stream is down (it then bounds the loss), so an idle writer switches segments at
# most hourly.
ARCHIVE_TIMEOUT = 3600
# A recovery point (base backup) for a running job this often, s...
BASE_BACKUP_INTERVAL = 3600.0
# ...and after this much WAL since the last one, bytes (bounds what a restore replays).
BASE_BACKUP_WAL_BYTES = 512 * 2**20
# A job with no client session for this long is paused, s.
IDLE_TIMEOUT = 600.0
# How long a client is held while its job wakes before 57P03, s.
WAKE_TIMEOUT = 60.0
# The local backend keeps paused jobs' clean PGDATA up to this many bytes.
WARM_CACHE_BYTES = 10 * 2**30
# The router's client port.
ROUTER_PORT = 6432
# The controller's HTTP API.
API_LISTEN = "127.0.0.1:6480"

STATE_DIR_ENV = "JOBMESH_STATE_DIR"
DEFAULT_STATE_DIR = Path(".jobmesh")


def state_dir(arg: Path | str | None = None) -> Path:
    """The mesh's state directory: ``--state-dir``, else ``JOBMESH_STATE_DIR``, else ``./.jobmesh``.

    Only resolves the path: nothing is created here (callers that need the
    directory make it when they act, not while parsing flags).
    """
    return Path(arg or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
