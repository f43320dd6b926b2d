"""Timeline histories: is a snapshot on the past of the job's newest timeline?

Every promotion (the end of a recovery from the store) starts a new timeline
and archives its history file, one line per ancestor: the parent timeline
and the LSN where the new one branched off (``1\\t0/3000158\\tno recovery
target specified``). Restores follow the newest timeline, as PostgreSQL's
``recovery_target_timeline = 'latest'`` does. A snapshot taken on an
ancestor timeline *after* that timeline's branch point, or on a timeline
that is no ancestor at all, is not on that past: it was written by an
incarnation that kept running after another took over (``fence.py``), or it
precedes a point-in-time restore that rewound the job. Restores skip it.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from .manifest import Manifest, history_key, job_prefix
from .store import NotFound, Store, get_bytes
from .walnames import format_lsn, history_timeline, is_history, parse_lsn


@dataclass(frozen=True)
class History:
    timeline: int  # the newest timeline
    ends: dict[int, int]  # each ancestor timeline -> the LSN where the next one branched off


def parse_history(timeline: int, text: str) -> History:
    """A timeline history file's content (comments and blank lines ignored)."""
    ends: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            ends[int(fields[0])] = parse_lsn(fields[1])
    return History(timeline, ends)


async def read_newest_history(store: Store, job: str) -> History | None:
    """The newest timeline's history in the store (None: only timeline 1 ever ran)."""
    prefix = f"{job_prefix(job)}wal/history/"
    names = [o.key[len(prefix):].removesuffix(".zst") for o in await store.list(prefix)]
    timelines = [history_timeline(n) for n in names if is_history(n)]
    if not timelines:
        return None
    newest = max(timelines)
    try:
        blob = await get_bytes(store, history_key(job, f"{newest:08X}.history"))
    except NotFound:
        return None  # removed while we looked: judge nothing
    text = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 20)
    return parse_history(newest, text.decode("utf-8", "replace"))


def off_history(m: Manifest, history: History | None) -> str | None:
    """Why the snapshot is not on the newest timeline's past, or None when it is (or when
    nothing can tell: no history, a snapshot older than timelines, a newer timeline whose
    history is not stored yet)."""
    if history is None or not m.timeline or m.timeline >= history.timeline:
        return None
    end = history.ends.get(m.timeline)
    if end is None:
        return (f"it is on timeline {m.timeline}, which is not in the history of the newest "
                f"timeline {history.timeline} (an abandoned branch)")
    position = m.end_lsn or m.start_lsn
    if position and parse_lsn(position) > end:
        return (f"it is on timeline {m.timeline} at {position}, past {format_lsn(end)} where "
                f"timeline {history.timeline}'s past left it: written by an incarnation that "
                f"went on after another took over (or before a point-in-time restore)")
    return None
