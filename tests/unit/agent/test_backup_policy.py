"""When a base backup is due (``agent/sidecar/policy.py``): by time, by WAL volume, by
timeline."""

from __future__ import annotations

from datetime import UTC, datetime

from jobmesh.agent.manifest import Manifest
from jobmesh.agent.sidecar.policy import BackupPolicy, Position, next_base_backup

NOW = 1_800_000_000.0
MIB = 2**20


def manifest(kind: str, *, timeline: int = 1, start_lsn: str = "0/3000028",
             age: float = 60.0) -> Manifest:
    created = datetime.fromtimestamp(NOW - age, UTC).isoformat()
    return Manifest(kind=kind, id=f"{kind}-{timeline}", job="j",  # type: ignore[arg-type]
                    created_at=created, objects=[], timeline=timeline, start_lsn=start_lsn)


POLICY = BackupPolicy(interval=3600, wal_bytes=512 * MIB)


def due(policy: BackupPolicy = POLICY, **kw: object):  # type: ignore[no-untyped-def]
    args = {"now": NOW, "started": NOW - 10, "history_loaded": True, "last_snapshot": None,
            "last_base": None, "position": None, **kw}
    return next_base_backup(policy, **args)  # type: ignore[arg-type]


def test_a_job_without_any_recovery_point_gets_one_at_once() -> None:
    assert due().seconds == 0


def test_nothing_is_decided_before_the_store_was_read() -> None:
    assert due(history_loaded=False).why == "the interval"


def test_the_interval_counts_from_the_latest_base_backup_or_the_agent_start() -> None:
    base = manifest("base", age=600)
    position = Position(1, 0x3000028 + MIB)
    assert due(started=NOW - 3000, last_snapshot=base, last_base=base,
               position=position).seconds == 3000
    assert due(started=NOW - 10, last_snapshot=base, last_base=base,
               position=position).seconds == 3590


def test_a_new_timeline_gets_a_base_backup_at_once() -> None:
    base = manifest("base", timeline=1)
    d = due(last_snapshot=base, last_base=base, position=Position(2, 0x9000000))
    assert d.seconds == 0 and "timeline 2" in d.why


def test_a_job_with_only_pause_snapshots_on_its_timeline_waits_for_the_interval() -> None:
    pause = manifest("pause", timeline=1)
    assert due(last_snapshot=pause, position=Position(1, 0x9000000)).seconds > 0


def test_so_much_wal_since_the_base_backup_makes_one_due() -> None:
    base = manifest("base", start_lsn="0/3000028")
    below = Position(1, 0x3000028 + 512 * MIB - 1)
    assert due(last_snapshot=base, last_base=base, position=below).seconds > 0
    at = Position(1, 0x3000028 + 512 * MIB)
    assert due(last_snapshot=base, last_base=base, position=at).seconds == 0
    off = BackupPolicy(interval=3600, wal_bytes=0)
    assert due(off, last_snapshot=base, last_base=base, position=at).seconds > 0


def test_a_failed_backup_is_retried_no_sooner_than_asked() -> None:
    assert due(retry_at=NOW + 30).seconds == 30


def test_interval_zero_turns_every_scheduled_backup_off() -> None:
    assert due(BackupPolicy(interval=0, wal_bytes=MIB)) is None
