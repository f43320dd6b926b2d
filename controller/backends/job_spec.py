"""What both backends read from a job's spec (the rest of it is each backend's own)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def archive_timeout(spec: Mapping[str, Any], default: int) -> int:
    """The job's PostgreSQL ``archive_timeout`` (s): the spec's, else ``default``.
    ValueError for anything but a whole number >= 0."""
    raw = spec.get("archive_timeout", default)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"archive_timeout must be a whole number of seconds >= 0, "
                         f"not {raw!r}")
    return raw
