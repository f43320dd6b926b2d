"""The errors every component shares, and the one way an error becomes a line.

A leaf module: it imports nothing of jobmesh, so the router, the agent and
the controller may all use it (an import contract says so).
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad flags, settings or files: the CLI prints one line and exits with status 2."""


class CommandFailed(Exception):
    """The input was fine but the work failed (a service unreachable, a process that
    did not start): the CLI prints one line and exits with status 1."""


def one_line(exc: BaseException | str, width: int | None = None) -> str:
    """An error (or any text) as one line, whitespace folded; cut to ``width`` with "...".

    An exception with no message is shown by its type's name, never as an
    empty line.
    """
    text = exc if isinstance(exc, str) else (" ".join(str(exc).split()) or type(exc).__name__)
    text = " ".join(text.split())
    if width is not None and len(text) > width:
        return text[: max(width - 3, 0)] + "..."
    return text
