"""Process trees on this host: find and kill what a container started."""

from __future__ import annotations

import contextlib
import os
import signal
from collections import defaultdict
from pathlib import Path


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc; the shim has its own copy)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                children[int(stat.rpartition(")")[2].split()[1])].append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(pid: int) -> None:
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
