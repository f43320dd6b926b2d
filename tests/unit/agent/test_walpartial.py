"""Streamed WAL deltas: their names, and which of them rebuild a segment."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from jobmesh.agent.errors import AgentError
from jobmesh.agent.walnames import SEGMENT_SIZE
from jobmesh.agent.walpartial import (
    Delta,
    compress,
    contiguous,
    covered,
    decompress,
    delta_key,
    parse_delta_key,
    streamed_since,
)

SEG = "000000020000000000000007"


def test_a_delta_key_names_its_segment_and_byte_range() -> None:
    d = Delta(SEG, 0x2000, 0x24737)
    key = delta_key("job1", d)
    assert key == f"job1/wal/partial/{SEG}/00002000-00024737.zst"
    assert parse_delta_key("job1", key) == d


def test_a_delta_key_names_the_generation_that_sent_it() -> None:
    d = Delta(SEG, 0, 0x100, generation=12)
    key = delta_key("job1", d)
    assert key == f"job1/wal/partial/{SEG}/00000000-00000100.g12.zst"
    assert parse_delta_key("job1", key) == d
    assert key != delta_key("job1", Delta(SEG, 0, 0x100, generation=13))  # never the same


def test_of_two_deltas_that_reach_as_far_the_newer_generation_is_taken() -> None:
    old, new = Delta(SEG, 0, 0x100, generation=3), Delta(SEG, 0, 0x100, generation=4)
    assert contiguous([new, old]) == [new]
    assert contiguous([old, Delta(SEG, 0, 0x80, generation=9)]) == [old]  # reach first


@pytest.mark.parametrize("key", [
    f"job1/wal/00000002/{SEG}.zst",                  # a whole segment
    f"job1/wal/partial/{SEG}/00000000-00000010.gx.zst",  # a generation is a number
    f"job1/wal/partial/{SEG}/00000010-00000010.zst",  # empty
    f"job1/wal/partial/{SEG}/00000000-01000001.zst",  # past the segment's end
    "job1/wal/partial/nonsense/00000000-00000010.zst",
    f"job2/wal/partial/{SEG}/00000000-00000010.zst",  # another job
])
def test_other_keys_are_not_deltas(key: str) -> None:
    assert parse_delta_key("job1", key) is None


def test_contiguous_deltas_chain_from_zero_up_to_the_first_gap() -> None:
    ds = [Delta(SEG, 0, 100), Delta(SEG, 100, 250), Delta(SEG, 300, 400)]
    assert contiguous(ds) == ds[:2]
    assert covered(ds) == 250


def test_deltas_not_starting_at_zero_cover_nothing() -> None:
    assert contiguous([Delta(SEG, 100, 200)]) == []
    assert covered([]) == 0


def test_overlapping_deltas_take_the_one_reaching_furthest() -> None:
    # an agent restarted mid-segment re-ships from an offset it had already shipped
    ds = [Delta(SEG, 0, 100), Delta(SEG, 50, 120), Delta(SEG, 100, 110), Delta(SEG, 120, 130)]
    assert contiguous(ds) == [Delta(SEG, 0, 100), Delta(SEG, 50, 120), Delta(SEG, 120, 130)]


def test_a_delta_whose_content_disagrees_with_its_name_is_refused() -> None:
    blob = compress(b"x" * 10)
    assert decompress("k", blob, 10) == b"x" * 10
    with pytest.raises(AgentError, match="11"):
        decompress("k", blob, 11)
    with pytest.raises(AgentError, match="corrupt"):
        decompress("k", blob[:-3] + b"\0\0\0", 10)


def test_what_was_streamed_ends_at_the_last_written_byte(tmp_path: Path) -> None:
    path = tmp_path / f"{SEG}.partial"
    with path.open("wb") as f:  # as pg_receivewal: padded to a whole segment first
        f.truncate(SEGMENT_SIZE)
        f.write(b"\1" * 1000 + b"\0" * 8 + b"\2" * 10)
    assert len(streamed_since(path, 0)) == 1018
    assert streamed_since(path, 1000) == b"\0" * 8 + b"\2" * 10
    assert streamed_since(path, 1018) == b""


class _TornFirstRead(io.BytesIO):
    """A file whose first read sees one page still zero, and the bytes written past it:
    what a read that races pg_receivewal's write can see (the page cache does not
    serialise them). Later reads see the file as it is."""

    def __init__(self, data: bytes, hole: slice) -> None:
        super().__init__(data)
        self._torn = bytearray(data)
        self._torn[hole] = bytes(hole.stop - hole.start)

    def read(self, size: int | None = -1) -> bytes:
        if self._torn is None:
            return super().read(size)
        at, torn, self._torn = self.tell(), bytes(self._torn), None
        got = super().read(size)
        return torn[at:at + len(got)]


def test_a_torn_read_of_the_partial_file_is_never_shipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"{SEG}.partial"
    written = bytes(range(1, 256)) * 100  # WAL as far as pg_receivewal has written it
    data = written + bytes(SEGMENT_SIZE - len(written))
    monkeypatch.setattr(Path, "open", lambda self, mode="r": _TornFirstRead(
        data, slice(8192, 16384)))
    assert streamed_since(path, 0) == written
    assert streamed_since(path, 100) == written[100:]
