"""Manifests and the store layout: pure functions, plain values."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobmesh.agent import manifest as m


def _manifest(**kw) -> m.Manifest:
    base = dict(kind="pause", id=m.new_id(), job="j1", created_at=m.now_iso(),
                objects=[m.ObjectEntry("j1/snapshots/x/data.tar.zst", 10, "ab" * 32)])
    base.update(kw)
    return m.Manifest(**base)


def test_manifest_round_trips_through_json():
    man = _manifest(timeline=2, start_lsn="0/3000028", extra={"note": "x"})
    assert m.Manifest.from_json(man.to_json()) == man


@pytest.mark.parametrize("data", [b"not json", b"{}", b'{"format": 99}',
                                  b'{"format": 1, "objects": [{"bogus": 1}]}'])
def test_unreadable_manifests_raise_manifest_error(data):
    with pytest.raises(m.ManifestError):
        m.Manifest.from_json(data)


def test_snapshot_ids_sort_in_time_order():
    early = m.new_id(datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC))
    late = m.new_id(datetime(2026, 1, 2, 3, 4, 5, 7000, tzinfo=UTC))
    assert early < late


def test_only_snapshots_with_a_manifest_count():
    keys = ["j/snapshots/a/data.tar.zst", "j/snapshots/a/manifest.json",
            "j/snapshots/b/data.tar.zst", "j/snapshots/c/manifest.json",
            "other/snapshots/d/manifest.json"]
    assert m.snapshot_ids_with_manifest(keys, "j") == ["a", "c"]


def test_wal_keys_group_segments_by_timeline():
    segment = "000000020000000000000003"
    assert m.wal_key("j", segment) == f"j/wal/00000002/{segment}.zst"


def test_object_lookup_names_the_missing_key():
    man = _manifest()
    assert man.object("j1/snapshots/x/data.tar.zst").size == 10
    with pytest.raises(m.ManifestError, match="no object"):
        man.object("j1/other")
