"""The agent's user-facing error: one line on the CLI, a JSON body over HTTP."""

from __future__ import annotations


class AgentError(Exception):
    """Bad input or a failed operation the user can act on (exit status 1, no traceback)."""
