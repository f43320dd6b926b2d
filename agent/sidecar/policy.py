"""When the next base backup is due: the rules, without I/O.

A restore from the store replays the WAL between its base backup and the
end of the archive, so the agent keeps that stretch short:

- a job with no recovery point at all gets a base backup at once (until then
  a lost disk would lose everything it ever wrote);
- a server on a timeline that has no base backup gets one at once: that is
  a job restored from the store and promoted, and its next restore would
  otherwise replay everything since the old backup, across the promotion
  (a job that only ever had pause snapshots counts the newest one);
- every ``wal_bytes`` of WAL since the latest base backup's start;
- and ``interval`` seconds after the latest one (or after the agent's own
  start), whichever is later.

Pause snapshots do not reset the clock: after a resume only a base backup
bounds what a restore replays. ``interval`` 0 turns every scheduled base
backup off; ``wal_bytes`` 0 only the WAL-volume rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..manifest import Manifest
from ..walnames import WalNameError, parse_lsn


@dataclass(frozen=True)
class BackupPolicy:
    interval: float  # s between base backups; 0: no scheduled base backups at all
    wal_bytes: int  # WAL bytes since the latest base backup's start; 0: no such rule


@dataclass(frozen=True)
class Position:
    """Where the running server writes WAL."""

    timeline: int
    lsn: int


@dataclass(frozen=True)
class Due:
    seconds: float
    why: str


def created_at(m: Manifest) -> float | None:
    try:
        return datetime.fromisoformat(m.created_at).timestamp()
    except ValueError:
        return None


def wal_since(base: Manifest, position: Position) -> int | None:
    """WAL bytes the server wrote since ``base`` started (None: not comparable)."""
    if base.timeline != position.timeline:
        return None
    try:
        return position.lsn - parse_lsn(base.start_lsn)
    except WalNameError:
        return None


def next_base_backup(policy: BackupPolicy, *, now: float, started: float,
                     history_loaded: bool, last_snapshot: Manifest | None,
                     last_base: Manifest | None, position: Position | None,
                     retry_at: float = 0.0) -> Due | None:
    """When the next base backup is due, and why; None: never (scheduling is off)."""
    if policy.interval <= 0:
        return None
    not_before = max(retry_at - now, 0.0)
    if history_loaded and last_snapshot is None:
        return Due(not_before, "the job has no recovery point in the store")
    if history_loaded and position is not None:
        newest = last_base or last_snapshot
        if newest is not None and newest.timeline and newest.timeline != position.timeline:
            return Due(not_before, f"timeline {position.timeline} has no base backup")
        since = wal_since(last_base, position) if last_base is not None else None
        if (policy.wal_bytes > 0 and last_base is not None and since is not None
                and since >= policy.wal_bytes):
            return Due(not_before, f"{since / 2**20:,.0f} MiB of WAL since base backup "
                                   f"{last_base.id}")
    age = now - started
    if last_base is not None and (at := created_at(last_base)) is not None:
        age = min(age, now - at)
    return Due(max(policy.interval - age, not_before), "the interval")
