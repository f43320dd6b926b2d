"""The one rule for job ids, used by the CLI, the API, the catalog, the router and the agent.

A job id is 1 to 59 characters: lowercase letters a-z, digits, '-' and '_',
starting with a letter or a digit. Why 59: the job's database is ``job_<id>``
and PostgreSQL names are at most 63 bytes; on Kubernetes its pod is
``job-<id>``, a DNS label of at most 63 characters.

A leaf module: it imports nothing of jobmesh.
"""

from __future__ import annotations

import re

MAX_LENGTH = 59
JOB_ID = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_LENGTH - 1}}}")
RULE = (f"job ids are 1-{MAX_LENGTH} characters: lowercase a-z, 0-9, '-' and '_', "
        "starting with a letter or digit")


def is_job_id(text: str) -> bool:
    return JOB_ID.fullmatch(text) is not None


def why_not(text: str) -> str | None:
    """None for a good id; else what is wrong with it, for a message (the rule follows)."""
    if is_job_id(text):
        return None
    if not text:
        return "the id is empty"
    if len(text) > MAX_LENGTH:
        return f"it is {len(text)} characters long"
    if is_job_id(text.lower()):
        return "ids are lowercase"
    if not text[0].isalnum():
        return "it must start with a letter or digit"
    bad = sorted({c for c in text if not (c.isascii() and (c.isalnum() or c in "-_"))})
    return f"it contains {' '.join(repr(c) for c in bad)}" if bad else "ids are lowercase"


def message(text: str) -> str:
    """``bad job id 'X': <why>; <the rule>``."""
    return f"bad job id {text!r}: {why_not(text)}; {RULE}"
