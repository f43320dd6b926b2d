"""The local backend's template, built once per test session and copied into new stores.

A controller on the local backend finds its template in its store, or builds one
(initdb, a start for the extensions, a snapshot): seconds per mesh. A copy of a store
that already holds it lets each mesh restore the template instead. Each test gets its
own copy, so nothing is shared between tests but the bytes.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from jobmesh.controller.backends.local.backend import LocalBackend


def build_template_store(root: Path) -> Path:
    """A file:// store directory under ``root`` holding only the local backend's template."""
    store = root / "store"

    async def build() -> None:
        backend = LocalBackend(root / "state", f"file://{store}", spares=0)
        await backend.start()
        await backend.close()

    root.mkdir(mode=0o755, exist_ok=True)
    asyncio.run(build())
    return store


def seed_store(template_store: Path, dest: Path) -> None:
    """Make ``dest`` a store directory that holds (a copy of) the template."""
    shutil.copytree(template_store, dest, symlinks=True, dirs_exist_ok=True)
