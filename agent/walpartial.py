"""Deltas of an unfinished WAL segment: names in the store, and putting them back together.

While a segment is being written, the streamer (``stream.py``) uploads what
arrived since its last upload as one small zstd object per window, named by
the segment, the byte range it covers and the generation that sent it
(``fence.py``; two incarnations never write the same name)::

    wal/partial/<segment>/<start:08X>-<end:08X>.g<generation>.zst

(``<start>-<end>.zst``, without a generation, is a delta from an unfenced
agent or one older than generations: generation 0.)

Once the whole segment is stored (the archive path, ``wal.py``), its deltas
are deleted. A restore that finds no whole segment rebuilds it from the
deltas that are contiguous from offset 0, padded with zeros to a full
segment: recovery replays up to the last streamed record and then stops,
as at the end of any WAL. Pure code except ``fetch_from_deltas``.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from .errors import AgentError
from .manifest import job_prefix
from .store import NotFound, Store, get_bytes
from .walnames import SEGMENT_SIZE, is_segment

_DELTA = re.compile(r"^([0-9A-F]{24})/([0-9A-F]{8})-([0-9A-F]{8})(?:\.g([0-9]{1,12}))?\.zst$")


@dataclass(frozen=True, order=True, slots=True)
class Delta:
    """Bytes ``start``..``end`` (exclusive) of WAL segment ``segment``."""

    segment: str
    start: int
    end: int
    generation: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start


def partial_prefix(job: str, segment: str | None = None) -> str:
    """Where deltas live: of one segment, or of all."""
    base = f"{job_prefix(job)}wal/partial/"
    return f"{base}{segment}/" if segment else base


def delta_key(job: str, d: Delta) -> str:
    gen = f".g{d.generation}" if d.generation else ""
    return f"{partial_prefix(job, d.segment)}{d.start:08X}-{d.end:08X}{gen}.zst"


def parse_delta_key(job: str, key: str) -> Delta | None:
    """The delta a key names, or None for anything else."""
    base = partial_prefix(job)
    if not key.startswith(base):
        return None
    m = _DELTA.match(key[len(base):])
    if m is None or not is_segment(m.group(1)):
        return None
    start, end = int(m.group(2), 16), int(m.group(3), 16)
    if not 0 <= start < end <= SEGMENT_SIZE:
        return None
    return Delta(m.group(1), start, end, int(m.group(4) or 0))


def contiguous(deltas: list[Delta]) -> list[Delta]:
    """The deltas that chain from offset 0 without a gap, in order (of one segment).

    Overlaps are allowed (an agent restarted mid-segment may upload from an
    offset it had shipped before; the bytes are the same): each step takes
    the delta that reaches furthest among those starting at or before the
    current end (of two that reach as far, the newer generation's).
    """
    chain: list[Delta] = []
    end = 0
    pool = sorted(deltas)
    while True:
        best = max((d for d in pool if d.start <= end < d.end),
                   key=lambda d: (d.end, d.generation), default=None)
        if best is None:
            return chain
        chain.append(best)
        end = best.end


def covered(deltas: list[Delta]) -> int:
    """How many bytes from offset 0 the deltas cover without a gap."""
    chain = contiguous(deltas)
    return chain[-1].end if chain else 0


def compress(data: bytes) -> bytes:
    """One zstd frame with its content size and checksum (what ``decompress`` verifies)."""
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def decompress(key: str, blob: bytes, expected: int) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(blob, max_output_size=SEGMENT_SIZE)
    except zstandard.ZstdError as exc:
        raise AgentError(f"{key} in the store is corrupt: {exc}") from exc
    if len(data) != expected:
        raise AgentError(f"{key} holds {len(data)} bytes, its name says {expected}")
    return data


async def fetch_from_deltas(store: Store, job: str, segment: str, f: BinaryIO) -> int:
    """Write ``segment`` rebuilt from its deltas into the open file ``f`` (a whole,
    zero-padded segment); returns how many streamed bytes it holds. Raises NotFound
    when no deltas start at offset 0."""
    deltas = [d for o in await store.list(partial_prefix(job, segment))
              if (d := parse_delta_key(job, o.key)) is not None and d.segment == segment]
    chain = contiguous(deltas)
    if not chain:
        raise NotFound(f"no WAL {segment} in the store, whole or streamed")
    end = 0
    for d in chain:
        key = delta_key(job, d)
        data = decompress(key, await get_bytes(store, key), d.size)
        skip = end - d.start  # an overlap: those bytes are written already
        await asyncio.to_thread(f.write, data[skip:])
        end = d.end
    await asyncio.to_thread(f.truncate, SEGMENT_SIZE)  # zeros: where the WAL ends
    await asyncio.to_thread(f.seek, 0, os.SEEK_END)
    return end


def streamed_since(path: Path, start: int) -> bytes:
    """What a ``.partial`` file pg_receivewal is writing holds from ``start`` on.

    pg_receivewal pads a new segment with zeros to its full size first, so the
    file size says nothing; the data ends at the last non-zero byte. WAL that
    happens to end in zero bytes is cut there and shipped with the next delta:
    the file is only ever appended to, so those bytes are zeros in both.

    The file is read twice. A read that races pg_receivewal's write can be torn:
    it sees a page still zero and, past it, bytes written just after (the page
    cache does not serialise a read with a write). pg_receivewal writes in
    offset order, so every byte below the last non-zero byte the first read saw
    was written before that read ended: the second read of that extent is exact.
    """
    with path.open("rb") as f:
        f.seek(start)
        seen = len(f.read(SEGMENT_SIZE - start).rstrip(b"\0"))
        f.seek(start)
        return f.read(seen)
