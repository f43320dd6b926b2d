"""The machine bench/wake.py runs on: what it is, how busy it is, its file system.

The machine is shared with other work, so every run records how busy it was
(load average, pressure stall information) and how expensive making a file
was just then, beside the versions and the file system of the work directory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from _backup_peers import pgbackrest_version
from _peers import REPO

from jobmesh.agent.postgres import bin_dir, give_to_postgres, run_pg


def busy() -> dict[str, Any]:
    """How busy the (shared) machine was just now: load average and pressure stall info."""
    out: dict[str, Any] = {"loadavg_1m": round(os.getloadavg()[0], 2)}
    for res in ("cpu", "io"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            some = Path(f"/proc/pressure/{res}").read_text().split()[1]  # avg10=x
            out[f"psi_{res}_some_avg10"] = float(some.split("=")[1])
    return out


def file_create_ms(root: Path, files: int = 1300) -> float:
    """Writing ``files`` 8 KB files (about the template's count): what an unpack pays per
    file on this disk just now, a yardstick for the restore step's fixed cost."""
    d = root / "calibrate"
    d.mkdir()
    payload = b"\0" * 8192
    started = time.perf_counter()
    for i in range(files):
        with (d / f"f{i}").open("wb") as f:
            f.write(payload)
    ms = (time.perf_counter() - started) * 1000
    shutil.rmtree(d)
    return round(ms, 1)


def make_workdir(stack: contextlib.ExitStack, base: Path | None) -> Path:
    """A temp dir (under ``base``, default /tmp) the postgres OS user can enter, removed at
    the end."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-bench-", dir=base))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    root.chmod(0o755)
    give_to_postgres(root)
    return root


def filesystem(path: Path) -> dict[str, Any]:
    """The file system under ``path``: its type, mount options, and whether it journals
    (ext4 without a journal skips recently deleted inodes when it makes new ones, which
    makes file creation after a big delete cost kernel CPU; see the README)."""
    best: list[str] = []
    where = str(path.resolve()).rstrip("/") + "/"
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        if where.startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[1] if best else ""):
            best = [dev, mnt, fstype, opts]
    if not best:
        return {}
    dev, mnt, fstype, opts = best
    out: dict[str, Any] = {"device": dev, "mount": mnt, "type": fstype, "options": opts}
    if fstype == "ext4":
        out["journal"] = any(Path("/proc/fs/jbd2").glob(f"{Path(dev).name}-*"))
    return out


def describe(cores: int) -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               "unknown")
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"nproc": cores, "cpu": cpu, "mem_gb": round(mem / 1e6, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "postgres": run_pg([str(bin_dir() / "postgres"), "--version"]).stdout.strip(),
            "pgbackrest": pgbackrest_version(), "asyncpg": asyncpg.__version__,
            "jobmesh_commit": commit or "unknown"}
