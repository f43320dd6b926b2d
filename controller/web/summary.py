"""What the status page computes from the catalog's rows: wake percentiles and their
histogram, the job list's filter, sort and page, and how sizes and times read.

Pure: no database, no HTTP. ``data.py`` feeds it rows; the templates show its values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..catalog.states import JobState

PAGE_SIZE = 100  # jobs a page lists; the counts above the list cover them all
# Wake latency buckets (upper bounds, s): a wake from the warm cache is well under a
# second, one restored from the store a few seconds, a queued one longer.
WAKE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, math.inf)


class SortKey:
    """The job list's orders: the query parameter, and the SQL it means."""

    SQL = {
        "id": "j.id",
        "state": "j.state, j.id",
        "size": "size_bytes DESC NULLS LAST, j.id",
        "last_active": "j.last_active DESC, j.id",
    }
    DEFAULT = "id"


@dataclass(frozen=True)
class ListQuery:
    """The job list the operator asked for (``?state=paused&sort=size&q=scrape&page=2``)."""

    states: tuple[JobState, ...] = ()  # none: every state
    sort: str = SortKey.DEFAULT
    search: str = ""  # a part of the job id
    page: int = 1

    @classmethod
    def parse(cls, params: Mapping[str, str], states: Sequence[str]) -> ListQuery:
        """From query parameters (``states``: every ``state=`` given); what cannot be
        understood is left at its default, so a bookmark with an old parameter still
        shows the page."""
        known = {s.value for s in JobState}
        chosen = tuple(JobState(s) for s in dict.fromkeys(states) if s in known)
        sort = params.get("sort", SortKey.DEFAULT)
        if sort not in SortKey.SQL:
            sort = SortKey.DEFAULT
        search = "".join(c for c in params.get("q", "") if c.isalnum() or c in "_-")[:63]
        try:
            page = max(1, int(params.get("page", "1")))
        except ValueError:
            page = 1
        return cls(chosen, sort, search.lower(), page)

    def link(self, *, sort: str | None = None, page: int | None = None) -> str:
        """The query string of this list in another order (from its first page) or at
        another page."""
        parts = [f"state={s}" for s in self.states]
        order = sort or self.sort
        if order != SortKey.DEFAULT:
            parts.append(f"sort={order}")
        if self.search:
            parts.append(f"q={self.search}")
        at = page if page is not None else (1 if sort is not None else self.page)
        if at != 1:
            parts.append(f"page={at}")
        return "?" + "&".join(parts)


@dataclass(frozen=True)
class Pages:
    page: int
    count: int  # at least 1

    @classmethod
    def of(cls, total: int, page: int, size: int = PAGE_SIZE) -> Pages:
        count = max(1, math.ceil(total / size))
        return cls(min(page, count), count)

    @property
    def offset(self) -> int:
        return (self.page - 1) * PAGE_SIZE


@dataclass(frozen=True)
class Bar:
    label: str
    count: int
    share: float  # of the tallest bar, 0..1: the bar's width


@dataclass(frozen=True)
class WakeStats:
    count: int
    p50: float | None  # seconds
    p95: float | None
    bars: tuple[Bar, ...]

    @classmethod
    def of(cls, seconds: Sequence[float]) -> WakeStats:
        ordered = sorted(seconds)
        counts = [0] * len(WAKE_BUCKETS)
        for s in ordered:
            counts[next(i for i, top in enumerate(WAKE_BUCKETS) if s <= top)] += 1
        tallest = max(counts) or 1
        labels, low = [], 0.0
        for top in WAKE_BUCKETS:
            labels.append(f"> {low:g} s" if math.isinf(top) else
                          f"< {top:g} s" if low == 0 else f"{low:g}-{top:g} s")
            low = top
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 95),
                   tuple(Bar(label, n, n / tallest)
                         for label, n in zip(labels, counts, strict=True)))


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The nearest-rank percentile of sorted values (None: no values)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def size(n: int | None) -> str:
    """Bytes as people read them (decimal units, as `df -H` and S3 consoles)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def lasted(since: datetime | None, now: datetime) -> str:
    """How long since ``since`` (``4 min``)."""
    return "-" if since is None else duration(max(0.0, (now - since) / timedelta(seconds=1)))


def ago(when: datetime | None, now: datetime) -> str:
    """``3 min ago``; ``-`` for never."""
    if when is None:
        return "-"
    seconds = max(0.0, (now - when) / timedelta(seconds=1))
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"


def describe(kind: str, from_state: str | None, to_state: str | None,
             duration_ms: float | None, moved: int | None, detail: dict[str, object],
             actor: str | None) -> str:
    """An event as a line of the job's timeline."""
    by = f" by {actor}" if actor else ""
    took = f" in {duration(duration_ms / 1000)}" if duration_ms is not None else ""
    if kind == "transition":
        if moved:
            took += f", {size(moved)} " + ("restored" if to_state == "running" else "stored")
        return f"{from_state or '-'} → {to_state}{took}"
    if kind == "desired":
        return f"asked to be {detail.get('desired_state', '?')}{by}"
    if kind == "wake-requested":
        return "a client's connection asked to wake it"
    if kind == "created":
        return f"created{by}"
    if kind == "error":
        then = " (given up: waits for a retry)" if detail.get("gave_up") else ""
        return f"{from_state or ''} failed: {detail.get('error', '?')}{then}"
    if kind in ("idle", "evicted"):
        return (f"idle for {duration(float(str(detail['idle_seconds'])))}: pausing"
                if "idle_seconds" in detail else f"{kind}: pausing")
    if kind == "retry":
        return f"retried{by}"
    if kind == "spec-updated":
        return "spec changed: " + ", ".join(f"{k}={v}" for k, v in detail.items()) + by
    if kind == "exported":
        return f"exported{took}" + (f", {size(moved)}" if moved else "") + by
    return f"{kind}{by}" + (f" ({from_state} → {to_state})" if to_state else "")
