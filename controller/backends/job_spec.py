"""What both backends read from a job's spec (the rest of it is each backend's own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.backend import PermanentError


class BadSpec(PermanentError, ValueError):
    """A job spec no backend can run: retrying cannot fix it (the API checks specs, so
    only a row written otherwise has one; delete the job and create it again). A
    ValueError too, for the callers that check values; a backend that wraps it
    (``raise BackendError(...) from exc``) keeps the failure permanent for the
    reconciler."""


def archive_timeout(spec: Mapping[str, Any], default: int) -> int:
    """The job's PostgreSQL ``archive_timeout`` (s): the spec's, else ``default``.
    BadSpec for anything but a whole number >= 0."""
    raw = spec.get("archive_timeout", default)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise BadSpec(f"archive_timeout must be a whole number of seconds >= 0, "
                      f"not {raw!r}")
    return raw


def wal_window(spec: Mapping[str, Any], default: float) -> float:
    """How often the job's agent sends the WAL it streamed (s): what a lost machine may
    lose. The spec's, else ``default``; 0 streams nothing (finished segments only)."""
    raw = spec.get("wal_window", default)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 86400:
        raise BadSpec(f"wal_window must be a number of seconds from 0 to 86400, not {raw!r}")
    return float(raw)
