"""What a failed test shows of the logs its servers wrote (CI keeps nothing else).

The fixtures that start a mesh call ``tell_if_failed`` on their way out: when the
test's call failed, the end of each log under the mesh's directory goes to
stderr, which pytest prints under the failure ("Captured stderr teardown").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

CALL_REPORT = pytest.StashKey[pytest.TestReport]()
LINES = 40  # the end of each log
MOST = 12  # logs at most (the most recently written first)


def tails(root: Path, lines: int = LINES, most: int = MOST) -> str:
    logs = []
    for path in root.rglob("*.log"):
        try:
            logs.append((path.stat().st_mtime, path))
        except OSError:
            continue
    out = []
    for _, path in sorted(logs, reverse=True)[:most]:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append(f"--- {path.relative_to(root)} (last {len(text)} lines)")
        out.extend(text)
    return "\n".join(out)


def tell_if_failed(node: pytest.Item, root: Path) -> None:
    report = node.stash.get(CALL_REPORT, None)
    if report is not None and report.failed and root.exists():
        print(tails(root), file=sys.stderr)
