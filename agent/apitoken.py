"""Who may call an agent's HTTP API: a bearer token per job, derived from one key.

The controller holds one key (a file it creates, or a Secret shared by its
replicas) and derives each job's token from it (HMAC-SHA256 of the job id), so
it never stores a token and knowing one job's token tells nothing of another's.
A job's agent gets its token from the controller (the local agent host in the
job's settings, a Kubernetes sidecar from the job's Secret) and refuses, with
401, every request that acts or reveals data without it; ``/healthz`` and
``/metrics`` stay open (probes and Prometheus scrapes; counters, no data). The
local agent host's own endpoints (starting and stopping agents) take a token of
their own, derived from the same key.

Library half: the controller imports it; it imports nothing of ours.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

TOKEN_ENV = "JOBMESH_AGENT_TOKEN"
OPEN_PATHS = ("/healthz", "/metrics")  # (suffixes: the host serves each job's under /jobs/ID)


def _derive(key: bytes, label: str) -> str:
    digest = hmac.new(key, f"jobmesh agent api\0{label}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def job_token(key: bytes, job: str) -> str:
    """The token of ``job``'s agent."""
    return _derive(key, f"job\0{job}")


def host_token(key: bytes) -> str:
    """The token of the local agent host's own endpoints."""
    return _derive(key, "host")


def header(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def authorized(given: str | None, expected: str) -> bool:
    """Whether an ``Authorization`` header carries ``expected`` (compared in constant
    time)."""
    scheme, _, value = (given or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              expected.encode())


def read_token(path: Path | None) -> str | None:
    """The token in ``path``, else in $JOBMESH_AGENT_TOKEN (None: neither)."""
    if path is not None:
        text = path.read_text().strip()
        if not text:
            raise ValueError(f"{path} is empty")
        return text
    return os.environ.get(TOKEN_ENV) or None
