"""``jobmesh job ...``: create, list, show, pause, resume, end, retry, delete, export, import."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobmesh.errors import one_line

from ..catalog.states import DesiredState, JobState
from ..mesh import MeshInfo
from .client import Client, RequestFailed
from .command import OpsError, print_json, seg, socket_timeout, wait_query
from .output import WIDTH, Bar, mb, table, when

DUMP_MAGIC = b"PGDMP"
# The verbs that set a job's desired state, and the state each asks for.
ACTIONS = {"pause": DesiredState.PAUSED, "resume": DesiredState.RUNNING,
           "end": DesiredState.ENDED}


def job_create(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    spec = {k: v for k in ("archive_timeout", "cpu", "memory", "disk")
            if (v := getattr(args, k)) is not None}
    job = client.call("POST", "/v1/jobs", body={"id": args.id, "spec": spec},
                      query=wait_query(args), timeout=socket_timeout(args))
    print(f"job {job['id']}: {job['state']}")
    if job["state"] == JobState.RUNNING:
        print(f"connect: psql \"host={mesh.router_host} port={mesh.router_port} "
              f"dbname=job_{job['id']} user=<user>\" (or `jobmesh psql {job['id']}`)")
    return 0


def job_list(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    jobs = client.call("GET", "/v1/jobs")["jobs"]
    if args.json:
        print_json(jobs)
        return 0
    if not jobs:
        print("no jobs yet: create one with `jobmesh job create ID`", file=sys.stderr)
        return 0
    rows = [("ID", "STATE", "DESIRED", "ADDRESS", "LAST ACTIVE", "ERROR")]
    rows += [(j["id"], j["state"], j["desired_state"],
              f"{j['host']}:{j['port']}" if j["host"] else "-", when(j["last_active"]),
              one_line(("gave up: " if j["gave_up"] else "") + (j["error"] or ""), WIDTH))
             for j in jobs]
    table(rows)
    return 0


def job_show(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    job = client.call("GET", f"/v1/jobs/{seg(args.id)}")
    if args.json:
        print_json(job)
        return 0
    fields = [
        ("state", f"{job['state']} (wanted {job['desired_state']})"),
        ("progress", job["progress"] or "-"),
        ("error", one_line(job["error"] or "-")),
        ("attempts", attempts(job)),
        ("address", f"{job['host']}:{job['port']}" if job["host"] else "-"),
        ("agent", job["agent_url"] or "-"), ("spec", json.dumps(job["spec"])),
        ("created", when(job["created_at"])), ("last active", when(job["last_active"])),
        ("connect", f"host={mesh.router_host} port={mesh.router_port} dbname=job_{job['id']}"),
    ]
    print(f"job {job['id']}")
    for k, v in fields:
        print(f"  {k + ':':<13}{v}")
    if job["snapshots"]:
        print("snapshots:")
        table([("ID", "KIND", "SIZE", "STORED", "CREATED")] + [
            (s["id"], s["kind"], mb(s["size_bytes"]), mb(s["stored_bytes"]),
             when(s["created_at"])) for s in job["snapshots"]], indent="  ")
    if job["events"]:
        print("events (newest last):")
        table([("AT", "KIND", "STATES", "TOOK", "BYTES", "DETAIL")] + [
            (when(e["at"]), e["kind"],
             f"{e['from_state'] or ''}->{e['to_state'] or ''}" if e["from_state"] or
             e["to_state"] else "",
             f"{e['duration_ms'] / 1000:.1f}s" if e["duration_ms"] is not None else "",
             mb(e["bytes"]), one_line(json.dumps(e["detail"]) if e["detail"] else "", WIDTH))
            for e in job["events"]], indent="  ")
    return 0


def attempts(job: dict[str, Any], now: datetime | None = None) -> str:
    """How many attempts failed, and what comes next: a retry in so many seconds, or
    none (the controller gave up: what the user can do about it)."""
    line = str(job["attempts"])
    if job["gave_up"]:
        return (f"{line}, gave up: it will not be retried (fix the cause, then `jobmesh job "
                f"retry {job['id']}`, or `jobmesh job delete {job['id']}`)")
    if job["next_attempt_at"]:
        due = datetime.fromisoformat(job["next_attempt_at"])
        wait = math.ceil((due - (now or datetime.now(UTC))).total_seconds())
        return f"{line}, next in {wait} s" if wait > 0 else f"{line}, next now"
    return line


def job_action(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("POST", f"/v1/jobs/{seg(args.id)}/{args.verb}", query=wait_query(args),
                      timeout=socket_timeout(args))
    wanted = ACTIONS[args.verb]
    note = "" if job["state"] == wanted else f" (wanted {wanted})"
    print(f"job {job['id']}: {job['state']}{note}")
    return 0


def job_retry(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("POST", f"/v1/jobs/{seg(args.id)}/retry", query=wait_query(args),
                      timeout=socket_timeout(args))
    wanted = job["desired_state"]
    note = "" if job["state"] == wanted else f" (wanted {wanted})"
    print(f"job {job['id']}: {job['state']}{note}")
    return 0


def job_delete(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("DELETE", f"/v1/jobs/{seg(args.id)}", query=wait_query(args),
                      timeout=socket_timeout(args))
    print(f"job {args.id}: deleted" if job is None else f"job {args.id}: {job['state']} "
          "(deletion requested)")
    return 0


def job_export(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    out = Path(args.output or f"{args.id}.pgdump")
    partial = out.with_name(out.name + ".partial")
    bar = Bar(f"exporting job {args.id}")

    def progress(total: int | None) -> Callable[[int], None]:
        bar.total = total
        return bar.advance

    try:
        with partial.open("wb") as f:
            got = client.download(f"/v1/jobs/{seg(args.id)}/export", f,
                                  query={"timeout": args.timeout}, progress=progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
    except OSError as exc:
        raise OpsError(f"cannot write {exc.filename or out}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    bar.finish(f"dump {got.dump_id}")
    print(f"exported job {args.id} to {out} ({mb(got.size)}, sha256 {got.sha256[:16]}...)")
    return 0


def job_import(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    try:
        f = args.file.open("rb")
    except OSError as exc:
        raise OpsError(f"cannot read {args.file}: {exc.strerror}") from None
    with f:
        if f.read(len(DUMP_MAGIC)) != DUMP_MAGIC:
            raise OpsError(f"{args.file} is not a pg_dump custom-format archive (hint: make "
                           "one with `pg_dump -Fc` or `jobmesh job export`)")
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        _must_be_new(client, args.id)  # before sending what may be gigabytes
        bar = Bar(f"importing {args.file}", size)
        try:
            job = client.upload(f"/v1/jobs/{seg(args.id)}/import", f, size,
                                query=wait_query(args), timeout=socket_timeout(args),
                                advance=bar.advance)
        finally:
            bar.finish()  # a failure (the load, after the upload) goes on a line of its own
    print(f"job {job['id']}: {job['state']} (imported {mb(size)})")
    return 0


def _must_be_new(client: Client, job_id: str) -> None:
    try:
        client.call("GET", f"/v1/jobs/{seg(job_id)}")
    except RequestFailed as exc:
        if exc.status == 404:
            return
        raise
    raise OpsError(f"job {job_id} already exists (hint: pick another id, or delete the job "
                   "first)")
