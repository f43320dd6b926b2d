"""WAL positions and file names: LSNs, segment names, and what a file in pg_wal is.

Postgres names a WAL segment after its timeline and its segment number
(``TTTTTTTTXXXXXXXXYYYYYYYY``: 8 hex digits each of timeline, high and low
part of the segment number), and archives a few other files beside the
segments: timeline history (``00000002.history``), backup history
(``<segment>.<offset>.backup``) and the last, incomplete segment of an old
timeline after a promotion (``<segment>.partial``). Pure code, no I/O; we
always initdb with the default 16 MiB segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEGMENT_SIZE = 16 << 20
SEGMENTS_PER_XLOGID = 0x1_0000_0000 // SEGMENT_SIZE  # 256 for 16 MiB segments

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_SEGMENT = re.compile(r"^[0-9A-F]{24}$")
_HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")
_PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")
_BACKUP = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")


class WalNameError(ValueError):
    pass


def parse_lsn(text: str) -> int:
    """``'0/16B3748'`` -> 23803720."""
    m = _LSN.match(text.strip())
    if not m:
        raise WalNameError(f"not an LSN: {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    """23803720 -> ``'0/16B3748'`` (Postgres's own spelling: upper case, no padding)."""
    if not 0 <= lsn < 1 << 64:
        raise WalNameError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFF_FFFF:X}"


@dataclass(frozen=True, order=True, slots=True)
class Segment:
    """One WAL segment: a timeline and a segment number (ordered: timeline first)."""

    timeline: int
    number: int

    @property
    def name(self) -> str:
        hi, lo = divmod(self.number, SEGMENTS_PER_XLOGID)
        return f"{self.timeline:08X}{hi:08X}{lo:08X}"

    @property
    def start_lsn(self) -> int:
        return self.number * SEGMENT_SIZE

    def next(self) -> Segment:
        return Segment(self.timeline, self.number + 1)

    def __str__(self) -> str:
        return self.name


def segment_of(timeline: int, lsn: int) -> Segment:
    """The segment that holds the byte at ``lsn``."""
    if timeline < 1:
        raise WalNameError(f"timeline must be >= 1, not {timeline}")
    return Segment(timeline, lsn // SEGMENT_SIZE)


def segment_ending_at(timeline: int, lsn: int) -> Segment:
    """The segment holding the record that *ends* at ``lsn``.

    An end position exactly on a segment boundary belongs to the previous
    segment (Postgres's ``XLByteToPrevSeg``): the backup stop record may end
    right where the next, not yet written, segment would start.
    """
    return segment_of(timeline, max(lsn - 1, 0))


def parse_segment(name: str) -> Segment:
    if not _SEGMENT.match(name):
        raise WalNameError(f"not a WAL segment name: {name!r}")
    hi, lo = int(name[8:16], 16), int(name[16:24], 16)
    if lo >= SEGMENTS_PER_XLOGID:
        raise WalNameError(f"not a WAL segment name for 16 MiB segments: {name!r}")
    return Segment(int(name[:8], 16), hi * SEGMENTS_PER_XLOGID + lo)


def next_segment(name: str) -> str:
    return parse_segment(name).next().name


def segment_range(first: str, last: str) -> list[str]:
    """Every segment name from ``first`` to ``last`` inclusive (same timeline)."""
    a, b = parse_segment(first), parse_segment(last)
    if a.timeline != b.timeline:
        raise WalNameError(f"{first} and {last} are on different timelines")
    return [Segment(a.timeline, n).name for n in range(a.number, b.number + 1)]


def is_segment(name: str) -> bool:
    return bool(_SEGMENT.match(name)) and int(name[16:24], 16) < SEGMENTS_PER_XLOGID


def is_history(name: str) -> bool:
    return bool(_HISTORY.match(name))


def is_partial(name: str) -> bool:
    return bool(_PARTIAL.match(name))


def is_backup_history(name: str) -> bool:
    return bool(_BACKUP.match(name))


def is_archivable(name: str) -> bool:
    """Whether Postgres could hand us this file to archive (anything else is not WAL)."""
    return is_segment(name) or is_history(name) or is_partial(name) or is_backup_history(name)


def history_timeline(name: str) -> int:
    if not is_history(name):
        raise WalNameError(f"not a timeline history file name: {name!r}")
    return int(name[:8], 16)
