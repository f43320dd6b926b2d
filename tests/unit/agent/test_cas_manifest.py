"""Format 2 manifests (files as content-addressed objects), and reading format 1 ones."""

from __future__ import annotations

import json

import pytest

from jobmesh.agent import manifest as m

pytestmark = pytest.mark.timeout(30)

NAMES = [f"{i:02x}" * 32 for i in range(4)]

# A pause manifest exactly as an agent before format 2 wrote it (json.dumps(asdict(...),
# indent=2, sort_keys=True) of the old dataclass: no files, dirs, key_id or chunk_size).
FORMAT_1 = """{
  "created_at": "2026-11-26T07:23:00.123Z",
  "end_lsn": "",
  "end_wal": "",
  "extra": {
    "compression": "zstd",
    "files": 1234,
    "format": "tar",
    "recycled_wal_skipped": 2
  },
  "format": 1,
  "generation": 3,
  "id": "20261126T072300123Z-1a2b",
  "job": "alpha",
  "kind": "pause",
  "objects": [
    {
      "key": "snapshots/20261126T072300123Z-1a2b/data.tar.zst",
      "sha256": "%s",
      "size": 4567890
    }
  ],
  "pg_version": "15",
  "start_lsn": "0/3000028",
  "start_wal": "",
  "system_identifier": "7300000000000000001",
  "timeline": 1,
  "uncompressed_size": 45678901
}
""" % ("ab" * 32)


def format_2(**kw: object) -> m.Manifest:
    base: dict[str, object] = dict(
        kind="pause", id=m.new_id(), job="alpha", created_at=m.now_iso(), objects=[],
        files=[m.FileEntry("PG_VERSION", 3, 0o600, 1_700_000_000_123_456_789, [NAMES[0]]),
               m.FileEntry("base/5/16384", (1 << 20) + 8192, 0o600, 1_700_000_001_000_000_000,
                           [NAMES[1], NAMES[2]]),
               m.FileEntry("empty", 0, 0o600, 1_700_000_002_000_000_000),
               m.FileEntry("pg_wal_link", 0, 0o777, 1_700_000_003_000_000_000,
                           link="../wal")],
        dirs=[m.DirEntry("base", 0o700), m.DirEntry("base/5", 0o700)],
        key_id="0065a1b2c3d4e5f6", chunk_size=1 << 20, timeline=1, start_lsn="0/3000028",
        extra={"new_objects": 2, "new_bytes": 1000, "read_bytes": 9000})
    base.update(kw)
    return m.Manifest(**base)  # type: ignore[arg-type]


def test_new_manifests_are_format_2() -> None:
    man = format_2()
    assert man.format == 2 and man.chunked
    assert json.loads(man.to_json())["format"] == 2


def test_a_format_2_manifest_round_trips_with_its_files_dirs_and_key() -> None:
    man = format_2()
    back = m.Manifest.from_json(man.to_json())
    assert back == man
    assert (back.files, back.dirs, back.key_id, back.chunk_size) == (
        man.files, man.dirs, "0065a1b2c3d4e5f6", 1 << 20)
    assert back.files[1].chunks == [NAMES[1], NAMES[2]]
    assert back.files[3].link == "../wal"


def test_a_format_2_manifest_without_files_round_trips() -> None:
    man = format_2(files=[], dirs=[])
    assert m.Manifest.from_json(man.to_json()) == man


def test_a_format_2_manifest_lists_the_objects_it_references() -> None:
    assert format_2().object_names() == {NAMES[0], NAMES[1], NAMES[2]}


def test_a_format_2_manifest_is_one_line_per_file() -> None:
    man = format_2()
    lines = man.to_json().decode().splitlines()
    for f in man.files:
        assert sum(f'"path":"{f.path}"' in line for line in lines) == 1


def test_a_format_1_manifest_as_older_agents_wrote_it_still_parses() -> None:
    man = m.Manifest.from_json(FORMAT_1)
    assert (man.format, man.chunked, man.kind, man.generation) == (1, False, "pause", 3)
    assert man.objects == [m.ObjectEntry("snapshots/20261126T072300123Z-1a2b/data.tar.zst",
                                         4567890, "ab" * 32)]
    assert (man.files, man.dirs, man.key_id, man.chunk_size) == ([], [], "", 0)
    assert man.object_names() == set()
    assert man.stored_size == 4567890
    assert man.extra["format"] == "tar"


def test_a_format_1_manifest_round_trips_as_format_1() -> None:
    man = m.Manifest.from_json(FORMAT_1)
    assert m.Manifest.from_json(man.to_json()) == man
    assert json.loads(man.to_json())["format"] == 1


def test_unknown_top_level_keys_are_ignored() -> None:
    doc = json.loads(format_2().to_json())
    doc["written_by"] = "a newer agent"
    doc["packs"] = [{"id": "p1", "objects": 3}]
    assert m.Manifest.from_dict(doc) == format_2(id=doc["id"], created_at=doc["created_at"])
    old = json.loads(FORMAT_1)
    old["something_new"] = {"x": 1}
    assert m.Manifest.from_dict(old) == m.Manifest.from_json(FORMAT_1)


@pytest.mark.parametrize("fmt", [3, 0, None, "2"])
def test_an_unknown_format_is_refused(fmt: object) -> None:
    doc = json.loads(format_2().to_json())
    doc["format"] = fmt
    with pytest.raises(m.ManifestError, match="unsupported manifest format"):
        m.Manifest.from_dict(doc)
    with pytest.raises(m.ManifestError, match="unsupported manifest format"):
        m.Manifest.from_json(json.dumps(doc))


@pytest.mark.parametrize("bad", [{"files": [{"path": "x"}]}, {"dirs": [{"mode": 1}]},
                                 {"files": "not a list"}])
def test_malformed_file_entries_raise_manifest_error(bad: dict[str, object]) -> None:
    doc = json.loads(format_2().to_json())
    doc.update(bad)
    with pytest.raises(m.ManifestError):
        m.Manifest.from_dict(doc)
