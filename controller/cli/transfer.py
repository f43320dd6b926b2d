"""``jobmesh job export`` and ``jobmesh job import``: a job's pg_dump out to a file, a
pg_dump file in as a new job.

An export writes into a hidden ``.partial`` file beside its target and renames
it only once the download is complete and verified: a failed export leaves
nothing, and an existing file is replaced only with ``--force``. An import
checks its file (readable, a regular file, a pg_dump custom-format archive) and
that the job id is free before it sends what may be gigabytes.
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..mesh import MeshInfo
from .client import Client, RequestFailed
from .command import OpsError, job_id, seg, socket_timeout, wait_query
from .output import Bar, mb

DUMP_MAGIC = b"PGDMP"  # pg_dump's custom format
WHERE_TO = "-o FILE, or -o DIR/ for DIR/ID.pgdump"


def export_path(output: str | None, job: str) -> Path:
    """Where an export of ``job`` goes: ``ID.pgdump`` here by default; ``DIR/ID.pgdump`` for
    an existing directory or a path ending in '/'; else the file named."""
    name = f"{job}.pgdump"
    if output is None:
        return Path(name)
    if not output:
        raise OpsError(f"-o names no file (hint: {WHERE_TO})")
    path = Path(output)
    directory = path if output.endswith("/") or path.is_dir() else path.parent
    if not directory.is_dir():
        why = (f"{directory} is not a directory" if directory.exists()
               else f"there is no directory {directory}")
        raise OpsError(f"cannot write {output}: {why} (hint: {WHERE_TO})")
    return path / name if directory == path else path


def job_export(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = job_id(args.id)
    out = export_path(args.output, job)
    if not args.force and os.path.lexists(out):
        raise OpsError(f"{out} exists (hint: --force overwrites it)")
    partial = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    bar = Bar(f"exporting job {job}")

    def progress(total: int | None) -> Callable[[int], None]:
        bar.total = total
        return bar.advance

    try:
        with partial.open("xb") as f:
            got = client.download(f"/v1/jobs/{seg(job)}/export", f,
                                  query={"timeout": args.timeout}, progress=progress)
            f.flush()
            os.fsync(f.fileno())
        if not args.force and os.path.lexists(out):  # made while the dump was on its way
            raise OpsError(f"{out} exists (hint: --force overwrites it)")
        os.replace(partial, out)
    except OSError as exc:
        raise OpsError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    bar.finish(f"dump {got.dump_id}")
    print(f"exported job {job} to {out} ({mb(got.size)}, sha256 {got.sha256[:16]}...)")
    return 0


def job_import(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = job_id(args.id)
    if not args.file:
        raise OpsError("no file to import (hint: jobmesh job import ID FILE)")
    path = Path(args.file)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise OpsError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        size = _check_dump(f, path)
        _must_be_new(client, job)  # before sending what may be gigabytes
        bar = Bar(f"importing {path}", size)
        try:
            created = client.upload(f"/v1/jobs/{seg(job)}/import", _Reading(f, path), size,
                                    query=wait_query(args), timeout=socket_timeout(args),
                                    advance=bar.advance)
        finally:
            bar.finish()  # a failure (the load, after the upload) goes on a line of its own
    print(f"job {created['id']}: {created['state']} (imported {mb(size)})")
    return 0


def _check_dump(f: BinaryIO, path: Path) -> int:
    """The size of the dump ``f``, after checking it is one; left at its start."""
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OpsError(f"cannot read {path}: not a regular file (hint: import a file "
                           "made by `pg_dump -Fc` or `jobmesh job export`)")
        head = f.read(len(DUMP_MAGIC))
        f.seek(0)
    except OSError as exc:
        raise OpsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != DUMP_MAGIC:
        raise OpsError(f"{path} is not a pg_dump custom-format archive (hint: make one with "
                       "`pg_dump -Fc` or `jobmesh job export`)")
    return st.st_size


class _Reading:
    """The file being uploaded, whose read errors are ours to report (the client would
    take an OSError for the API's connection failing)."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except OSError as exc:
            raise OpsError(f"cannot read {self.path}: {exc.strerror or exc}") from None


def _must_be_new(client: Client, job: str) -> None:
    try:
        client.call("GET", f"/v1/jobs/{seg(job)}")
    except RequestFailed as exc:
        if exc.status == 404:
            return
        raise
    raise OpsError(f"job {job} already exists (hint: pick another id, or delete the job "
                   "first)")
