"""How the operator commands show things: aligned tables, times, sizes, progress bars."""

from __future__ import annotations

from collections.abc import Sequence

from jobmesh.agent.progress import Progress

WIDTH = 80  # a table cell or an error shown inline is cut to this many characters


def table(rows: Sequence[tuple[str, ...]], indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def when(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def mb(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n:,} B"


class Bar:
    """A progress bar that appears with the first byte, so a request refused before any
    data flows stays one line on stderr."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label, self.total = label, total
        self._bar: Progress | None = None

    def advance(self, n: int) -> None:
        if self._bar is None:
            self._bar = Progress(self.label, self.total)
        self._bar.advance(n)

    def finish(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.finish(note)


def and_list(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(items) if len(items) < 3 else f"{', '.join(items[:-1])} and {items[-1]}"
