"""Every default that more than one module needs, in one place.

A leaf module (it imports nothing of jobmesh), so the router, the agent and
the controller read the same numbers. Flags' help texts format these values
rather than repeating them.
"""

from __future__ import annotations

import os
from pathlib import Path

# Durability: the longest a committed transaction may wait in a job's local
# WAL before it is archived to the store (PostgreSQL's archive_timeout), s.
ARCHIVE_TIMEOUT = 60
# A recovery point (base backup) for a running job this often, s.
BASE_BACKUP_INTERVAL = 3600.0
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
