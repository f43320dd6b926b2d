"""Removing a test's scratch directories without making the test wait for it.

A worker's session root holds gigabytes in tens of thousands of files (PGDATA
copies, stores, base backups) by the time it finishes, and deleting them took
up to 45 s of the last worker's teardown: pure wall time, since nothing waits
for the result. The directory is renamed at once (nothing can use it after)
and a detached ``rm -rf`` removes it in the background.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def remove_later(path: Path) -> None:
    """Make ``path`` disappear now and its contents soon; a missing path is fine."""
    trash = path.with_name(f".{path.name}.removing-{os.getpid()}")
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    except OSError:
        shutil.rmtree(path, ignore_errors=True)  # cannot rename (another file system?)
        return
    subprocess.Popen(["rm", "-rf", "--", str(trash)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
