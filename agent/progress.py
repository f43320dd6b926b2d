"""A progress bar for long CLI operations (snapshot, restore, dump, load).

Drawn on stderr only when it is a terminal; otherwise one log-style line at
the start and one at the end, so CI logs and pipes stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream or sys.stderr
        self._tty = enabled and self._stream.isatty()
        self._enabled = enabled
        self._started = time.monotonic()
        self._drawn = 0.0
        if enabled and not self._tty:
            self._stream.write(f"{label} ...\n")

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._tty and now - self._drawn >= 0.1:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = self.done / elapsed / 1e6
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = (f"\r{self.label} [{bar:<30}] {frac:6.1%} "
                    f"{self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB {rate:,.1f} MB/s")
        else:
            text = f"\r{self.label} {self.done / 1e6:,.1f} MB {rate:,.1f} MB/s"
        self._stream.write(text)
        self._stream.flush()

    def finish(self, note: str = "") -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        elapsed = max(now - self._started, 1e-6)
        if self._tty:
            self._draw(now)
            self._stream.write("\n")
        self._stream.write(f"{self.label}: {self.done / 1e6:,.1f} MB in {elapsed:.2f} s"
                           f"{' - ' + note if note else ''}\n")
        self._stream.flush()


class NoProgress(Progress):
    def __init__(self) -> None:
        super().__init__("", enabled=False)
