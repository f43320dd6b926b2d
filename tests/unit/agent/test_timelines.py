"""Which snapshots are on the past of the newest timeline (what restores keep)."""

from __future__ import annotations

import pytest

from jobmesh.agent.manifest import Manifest
from jobmesh.agent.timelines import History, off_history, parse_history

# Timeline 3 branched from 2 at 0/5000100, and 2 from 1 at 0/3000158.
TL3 = parse_history(3, "1\t0/3000158\tno recovery target specified\n\n"
                       "2\t0/5000100\tno recovery target specified\n")


def snapshot(timeline: int, start: str, end: str = "", kind: str = "pause") -> Manifest:
    return Manifest(kind=kind, id="x", job="j", created_at="", objects=[],  # type: ignore[arg-type]
                    timeline=timeline, start_lsn=start, end_lsn=end)


def test_a_history_file_lists_each_ancestor_and_where_it_ended() -> None:
    assert History(3, {1: 0x3000158, 2: 0x5000100}) == TL3


@pytest.mark.parametrize("m", [
    snapshot(3, "0/6000028"),                      # the newest timeline itself
    snapshot(1, "0/2000028"),                      # an ancestor, before it ended
    snapshot(2, "0/4000028", "0/5000100", "base"),  # ends right where its timeline did
    snapshot(4, "0/7000028"),                      # newer than the stored history
    snapshot(0, ""),                               # written before timelines were recorded
])
def test_snapshots_on_the_newest_timelines_past_are_kept(m: Manifest) -> None:
    assert off_history(m, TL3) is None


def test_a_snapshot_past_where_its_timeline_ended_is_skipped() -> None:
    why = off_history(snapshot(2, "0/5000200"), TL3)
    assert why is not None and "past 0/5000100" in why
    base = snapshot(1, "0/3000000", "0/3000200", "base")  # starts before, ends after
    assert off_history(base, TL3) is not None


def test_a_snapshot_on_an_abandoned_branch_is_skipped() -> None:
    history = parse_history(3, "1\t0/3000158\tbefore 2026-12-01\n")  # 3 branched from 1
    why = off_history(snapshot(2, "0/3000028"), history)
    assert why is not None and "abandoned branch" in why


def test_without_a_history_nothing_is_skipped() -> None:
    assert off_history(snapshot(1, "0/9000028"), None) is None
