"""A cgroup per local job: its PostgreSQL limited to the CPU and memory its spec asks for.

This is the bad-neighbour fix without Kubernetes: a job that burns CPU gets
its share and no more, and one that allocates past its memory limit has a
process killed by the kernel inside its own cgroup (PostgreSQL then restarts
its backends and recovers in place), never one of another job's.

cgroup v2 is used where its ``cpu`` and ``memory`` controllers can be
enabled for us; else v1's ``cpu`` and ``memory`` hierarchies (this machine
has those, and an empty v2 one). A job's group is made under the cgroup the
controller itself runs in (so limits around the controller still hold), in
a directory named for the backend's root, so two backends on one machine
never share one. Where neither can be written (not root, no delegation), the
jobs run unlimited and the backend says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("jobmesh.controller.local")

CGROUP_FS = Path("/sys/fs/cgroup")
PERIOD_US = 100_000  # the CFS period a CPU quota is a share of


@dataclass(frozen=True)
class Limits:
    cpu: float | None = None    # CPUs (0.5: half of one); None: unlimited
    memory: int | None = None   # bytes; None: unlimited


class Cgroups:
    """Where the jobs' groups go, and how to limit them (``mode`` None: nowhere)."""

    def __init__(self, root: Path, fs: Path = CGROUP_FS) -> None:
        self.name = "jobmesh-" + hashlib.sha1(str(root).encode()).hexdigest()[:8]
        self.fs = fs
        self.mode: str | None = None
        self.parents: list[tuple[str, Path]] = []  # (controller: "v2", "cpu", "memory"), dir
        self.why_not = ""
        try:
            self._find()
        except OSError as exc:
            self.mode, self.parents = None, []
            self.why_not = f"{exc.strerror}: {exc.filename}"
        if self.mode is None:
            log.warning("jobs run without CPU and memory limits: no cgroup can be made here "
                        "(%s)", self.why_not or "no cgroup v1 or v2 controllers")

    def _find(self) -> None:
        unified = self.fs if (self.fs / "cgroup.controllers").exists() else self.fs / "unified"
        controllers = _read(unified / "cgroup.controllers").split()
        if {"cpu", "memory"} <= set(controllers):
            parent = unified / _own_group("") / self.name
            parent.mkdir(exist_ok=True)
            (parent.parent / "cgroup.subtree_control").write_text("+cpu +memory")
            (parent / "cgroup.subtree_control").write_text("+cpu +memory")
            self.mode, self.parents = "v2", [("v2", parent)]
            return
        if (self.fs / "cpu" / "cgroup.procs").exists() and (
                self.fs / "memory" / "cgroup.procs").exists():
            parents = [(c, self.fs / c / _own_group(c) / self.name) for c in ("cpu", "memory")]
            for _, p in parents:
                p.mkdir(exist_ok=True)
            self.mode, self.parents = "v1", parents
            return
        self.why_not = "no cpu and memory controllers in v2, none mounted for v1"

    def prepare(self, job_id: str, limits: Limits, owner: int | None) -> list[Path]:
        """The job's groups with ``limits`` set; returns their ``cgroup.procs`` files (a
        process writes its pid there to join; ``owner``, a uid, may then do so itself)."""
        procs: list[Path] = []
        for controller, parent in self.parents:
            group = parent / job_id
            group.mkdir(exist_ok=True)
            if controller == "v2":
                quota = "max" if limits.cpu is None else str(int(limits.cpu * PERIOD_US))
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                (group / "memory.max").write_text(str(limits.memory or "max"))
                with contextlib.suppress(OSError):
                    (group / "memory.swap.max").write_text("0")
            elif controller == "cpu":
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(
                    "-1" if limits.cpu is None else str(int(limits.cpu * PERIOD_US)))
            else:
                (group / "memory.limit_in_bytes").write_text(str(limits.memory or -1))
            if owner is not None:
                os.chown(group / "cgroup.procs", owner, -1)
            procs.append(group / "cgroup.procs")
        return procs

    def remove(self, job_id: str) -> None:
        """Remove the job's groups (once nothing runs in them; else they stay)."""
        for _, parent in self.parents:
            with contextlib.suppress(OSError):
                (parent / job_id).rmdir()

    def groups(self, job_id: str) -> list[Path]:
        return [parent / job_id for _, parent in self.parents]


def _own_group(controller: str) -> str:
    """The cgroup this process is in, for a v1 ``controller`` ("" : the v2 one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller == "" and names == "") or controller in names.split(","):
            return path.lstrip("/")
    return ""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def parse_cpu(text: str) -> float:
    """A Kubernetes CPU quantity (``2``, ``0.5``, ``500m``) in CPUs."""
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_memory(text: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``1Gi``, ``1G``, bytes) in bytes."""
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * _UNITS[unit])
    return int(float(text))


def limits_of(spec: dict[str, object], cpu: str | None, memory: str | None) -> Limits:
    """The job's limits: its spec's ``cpu`` and ``memory``, else the defaults given."""
    raw_cpu, raw_memory = spec.get("cpu", cpu), spec.get("memory", memory)
    return Limits(None if raw_cpu is None else parse_cpu(str(raw_cpu)),
                  None if raw_memory is None else parse_memory(str(raw_memory)))
