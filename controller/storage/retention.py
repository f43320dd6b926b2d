"""Which snapshots a job keeps: the newest K pause snapshots, and what a point-in-time window needs.

Pure: manifests in, ids out. A point-in-time restore to any moment of the
last W replays WAL from a base backup that ended before that moment, so
every base backup that ended within the window is kept, and the newest one
that ended before it; the newest base backup is always kept (it is what a
recovery after a lost disk starts from). Pause snapshots cannot replay WAL:
the newest K are kept, as points to rewind to and as wake-ups.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from jobmesh import defaults
from jobmesh.agent.manifest import Manifest
from jobmesh.agent.restore import backup_end_time

KEEP_PAUSES = defaults.KEEP_PAUSES
PITR_WINDOW = defaults.PITR_WINDOW


@dataclass(frozen=True)
class Retention:
    keep_pauses: int = KEEP_PAUSES
    pitr_window: float = PITR_WINDOW  # seconds


def kept(snapshots: dict[str, Manifest], policy: Retention, now: datetime,
         pinned: dict[str, float] | None = None) -> set[str]:
    """The ids to keep, of a job's snapshots (id -> manifest, oldest first); ``pinned``
    (id -> until, epoch seconds) are kept until then whatever else says (the state a
    rewind replaced)."""
    pauses = [sid for sid, m in snapshots.items() if m.kind == "pause"]
    bases = [sid for sid, m in snapshots.items() if m.kind == "base"]
    keep = set(pauses[-policy.keep_pauses:]) if policy.keep_pauses > 0 else set()
    if pauses and not keep:
        keep.add(pauses[-1])  # a paused job wakes from its newest pause snapshot
    start = now - timedelta(seconds=policy.pitr_window)
    before = [sid for sid in bases if backup_end_time(snapshots[sid]) < start]
    keep.update(sid for sid in bases if backup_end_time(snapshots[sid]) >= start)
    if before:
        keep.add(before[-1])
    keep.update(sid for sid, until in (pinned or {}).items()
                if sid in snapshots and until > now.timestamp())
    return keep

