"""Secrets passed as files, never on a command line.

Anything in argv is readable by every local user through ``ps`` and
``/proc/<pid>/cmdline``; the environment is readable by the process's owner
through ``/proc/<pid>/environ`` and inherited by every child (PostgreSQL,
``pg_dump``). So every component that takes a secret also takes it as a file
(``--catalog-dsn-file``, ``--api-token-file``), and ``jobmesh up`` hands secrets
to what it starts as 0600 files.

A leaf module: it imports nothing of jobmesh but the shared errors.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from jobmesh.errors import UsageError

log = logging.getLogger("jobmesh.secrets")


def read_secret_file(path: Path, flag: str) -> str:
    """The file's first line, stripped; ``flag`` names the option in errors. A file others
    may read is used, with a warning (a Kubernetes Secret volume is 0644 by default)."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and not path.is_symlink():
        log.warning("%s: %s is readable by others (mode %o): chmod 600 it", flag, path,
                    stat.S_IMODE(st.st_mode))
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise UsageError(f"{flag}: {path} is empty")
    return lines[0].strip()


def write_secret_file(path: Path, value: str) -> Path:
    """Write ``value`` to ``path`` readable by its owner only (created 0600, never wider
    for a moment), replacing what was there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
    return path
