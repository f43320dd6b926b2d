"""Which snapshots a job keeps: the newest K pause snapshots, and what a point-in-time window needs.

Pure: manifests in, ids out. A point-in-time restore to any moment of the
last W replays WAL from a snapshot (a base backup, or a pause snapshot: the
next run's WAL continues from its shutdown checkpoint) taken before that
moment, so the newest snapshot taken before the window opened is kept (or,
for a job younger than W, its oldest), with the WAL from it on; so are the
base backups within the window (shorter replays) and the newest base backup
(what a recovery after a lost disk starts from). The newest K pause
snapshots are kept as wake-ups and points to go back to at once.
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
    keep = set(pauses[-max(1, policy.keep_pauses):])  # a paused job wakes from its newest
    start = now - timedelta(seconds=policy.pitr_window)
    # A point-in-time restore replays WAL from the newest snapshot (of either kind) taken
    # before the time it aims at: the newest one before the window opened reaches all of
    # it; a job younger than the window has only its oldest to start from.
    ordered = sorted(snapshots, key=lambda sid: backup_end_time(snapshots[sid]))
    before = [sid for sid in ordered if backup_end_time(snapshots[sid]) <= start]
    if policy.pitr_window > 0 and ordered:
        keep.add(before[-1] if before else ordered[0])
    # base backups within the window: shorter replays, at the cost of their new objects
    keep.update(sid for sid in ordered if snapshots[sid].kind == "base"
                and backup_end_time(snapshots[sid]) > start)
    bases = [sid for sid in ordered if snapshots[sid].kind == "base"]
    if bases:
        keep.add(bases[-1])  # what a recovery after a lost disk starts from
    keep.update(sid for sid, until in (pinned or {}).items()
                if sid in snapshots and until > now.timestamp())
    return keep
