"""WAL names and LSNs, checked against what PostgreSQL 15 itself prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobmesh.agent.walnames import (
    SEGMENT_SIZE,
    Segment,
    WalNameError,
    format_lsn,
    history_timeline,
    is_archivable,
    is_backup_history,
    is_history,
    is_partial,
    is_segment,
    next_segment,
    parse_lsn,
    parse_segment,
    segment_ending_at,
    segment_of,
    segment_range,
)


def test_lsn_parses_like_postgres_prints_it() -> None:
    assert parse_lsn("0/16B3748") == 0x16B3748
    assert parse_lsn("1/0") == 1 << 32
    assert parse_lsn("FFFFFFFF/FFFFFFFF") == (1 << 64) - 1
    assert parse_lsn("a/ff") == (0xA << 32) | 0xFF


def test_lsn_formats_in_postgres_spelling() -> None:
    assert format_lsn(0x16B3748) == "0/16B3748"
    assert format_lsn(0) == "0/0"
    assert format_lsn((3 << 32) | 0xA0) == "3/A0"


@pytest.mark.parametrize("bad", ["", "16B3748", "0/", "/1", "0/123456789", "g/1", "0/1/2"])
def test_malformed_lsn_is_refused(bad: str) -> None:
    with pytest.raises(WalNameError):
        parse_lsn(bad)


def test_lsn_out_of_range_is_refused() -> None:
    with pytest.raises(WalNameError):
        format_lsn(1 << 64)
    with pytest.raises(WalNameError):
        format_lsn(-1)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_lsn_round_trips(lsn: int) -> None:
    assert parse_lsn(format_lsn(lsn)) == lsn


def test_segment_name_matches_pg_walfile_name() -> None:
    # select pg_walfile_name('0/16B3748') on timeline 1 -> 000000010000000000000001
    assert segment_of(1, parse_lsn("0/16B3748")).name == "000000010000000000000001"
    # select pg_walfile_name('1/A3000028') -> 0000000100000001000000A3
    assert segment_of(1, parse_lsn("1/A3000028")).name == "0000000100000001000000A3"
    assert segment_of(0x1F, parse_lsn("0/0")).name == "0000001F0000000000000000"


def test_segment_boundary_belongs_to_the_next_segment_but_an_end_to_the_previous() -> None:
    boundary = 2 * SEGMENT_SIZE
    assert segment_of(1, boundary).name == "000000010000000000000002"
    assert segment_ending_at(1, boundary).name == "000000010000000000000001"
    assert segment_ending_at(1, boundary + 1).name == "000000010000000000000002"


def test_next_segment_carries_into_the_high_word() -> None:
    assert next_segment("000000010000000000000009") == "00000001000000000000000A"
    assert next_segment("0000000100000000000000FF") == "000000010000000100000000"


def test_segment_range_is_inclusive_and_crosses_the_high_word() -> None:
    names = segment_range("0000000100000000000000FE", "000000010000000100000001")
    assert names == ["0000000100000000000000FE", "0000000100000000000000FF",
                     "000000010000000100000000", "000000010000000100000001"]


def test_segment_range_refuses_two_timelines() -> None:
    with pytest.raises(WalNameError):
        segment_range("000000010000000000000001", "000000020000000000000002")


@given(st.integers(min_value=1, max_value=0xFFFFFFFF), st.integers(min_value=0,
                                                                   max_value=(1 << 40) - 1))
def test_segment_names_round_trip(timeline: int, number: int) -> None:
    seg = Segment(timeline, number)
    assert parse_segment(seg.name) == seg
    assert is_segment(seg.name)


def test_segment_start_lsn() -> None:
    assert parse_segment("000000010000000100000002").start_lsn == parse_lsn("1/2000000")


@pytest.mark.parametrize("name", ["000000010000000000000100", "00000001000000000000000g",
                                  "00000001000000000000000", "000000010000000000000001.partial"])
def test_not_a_segment(name: str) -> None:
    assert not is_segment(name)
    with pytest.raises(WalNameError):
        parse_segment(name)


def test_file_kinds_are_told_apart() -> None:
    kinds = {
        "000000010000000000000003": (True, False, False, False),
        "00000002.history": (False, True, False, False),
        "000000010000000000000003.partial": (False, False, True, False),
        "000000010000000000000003.00000028.backup": (False, False, False, True),
        "archtemp.000000010000000000000003.1234.99": (False, False, False, False),
        "00000002.history.tmp": (False, False, False, False),
    }
    for name, expected in kinds.items():
        got = (is_segment(name), is_history(name), is_partial(name), is_backup_history(name))
        assert got == expected, name
        assert is_archivable(name) == any(expected), name


def test_history_timeline() -> None:
    assert history_timeline("0000000A.history") == 10
    with pytest.raises(WalNameError):
        history_timeline("000000010000000000000003")


def test_timeline_zero_is_refused() -> None:
    with pytest.raises(WalNameError):
        segment_of(0, 0)
