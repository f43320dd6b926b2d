"""``jobmesh job ...``: create, list, show, pause, resume, end, retry and delete
(export and import are in ``transfer``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from typing import Any

from jobmesh.errors import one_line

from ..catalog.states import DesiredState, JobState
from ..mesh import MeshInfo
from .client import Client
from .command import job_id, seg, socket_timeout, wait_query
from .formats import print_data
from .output import WIDTH, and_list, mb, table, when
from .psql import connect_lines

# The verbs that set a job's desired state, and the state each asks for.
ACTIONS = {"pause": DesiredState.PAUSED, "resume": DesiredState.RUNNING,
           "end": DesiredState.ENDED}


def job_create(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    spec = {k: v for k in ("archive_timeout", "wal_window", "keep_pauses", "pitr_window",
                           "pool_mode", "pool_size", "max_connections", "cpu", "memory",
                           "disk")
            if (v := getattr(args, k)) is not None}
    job = client.call("POST", "/v1/jobs", body={"id": job_id(args.id), "spec": spec},
                      query=wait_query(args), timeout=socket_timeout(args))
    for w in job.get("warnings") or []:
        print(f"warning: {warning_text(w)}", file=sys.stderr)
    print(f"job {job['id']}: {job['state']}")
    if job["state"] == JobState.RUNNING:
        command, note = connect_lines(mesh, job["id"])
        print(f"connect: {command}\n         {note}")
    return 0


def job_update(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    spec = {k: v for k in ("pool_mode", "pool_size", "max_connections")
            if (v := getattr(args, k)) is not None}
    if not spec:
        print("jobmesh: job update: nothing to change: give --pool-mode, --pool-size or "
              "--max-connections", file=sys.stderr)
        return 2
    job = client.call("PATCH", f"/v1/jobs/{seg(job_id(args.id))}", body={"spec": spec})
    mode = job["spec"].get("pool_mode", "session")
    size = job["spec"].get("pool_size")
    limit = job["spec"].get("max_connections")
    print(f"job {job['id']}: pool_mode {mode}, pool_size {size or 'the router default'}, "
          f"max_connections {limit or 'no limit'}")
    return 0


def warning_text(w: dict[str, Any]) -> str:
    """An API warning in the CLI's words: the flags the user gave, not the spec's fields."""
    if w.get("kind") == "unenforced_limits" and w.get("fields"):
        flags = and_list([f"--{f}" for f in w["fields"]])
        those = "that limit" if len(w["fields"]) == 1 else "those limits"
        return (f"the {w.get('backend') or 'controller'} backend does not enforce {flags} "
                f"(the job runs without {those})")
    return one_line(str(w.get("message") or w))


def job_list(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    jobs = client.call("GET", "/v1/jobs")["jobs"]
    if print_data(jobs, args.output):
        return 0
    if not jobs:
        print("no jobs yet: create one with `jobmesh job create ID`", file=sys.stderr)
        return 0
    wide = args.output == "wide"  # more columns, and errors not cut short
    more = ("ATTEMPTS", "CREATED", "AGENT", "SPEC") if wide else ()
    rows = [("ID", "STATE", "DESIRED", "ADDRESS", "LAST ACTIVE", *more, "ERROR")]
    for j in jobs:
        extra = (str(j["attempts"]), when(j["created_at"]), j["agent_url"] or "-",
                 json.dumps(j["spec"]) if j["spec"] else "-") if wide else ()
        error = ("gave up: " if j["gave_up"] else "") + (j["error"] or "")
        rows.append((j["id"], j["state"], j["desired_state"],
                     f"{j['host']}:{j['port']}" if j["host"] else "-", when(j["last_active"]),
                     *extra, one_line(error, None if wide else WIDTH)))
    table(rows)
    return 0


def job_show(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    job = client.call("GET", f"/v1/jobs/{seg(job_id(args.id))}")
    if print_data(job, args.output):
        return 0
    command, note = connect_lines(mesh, job["id"])
    fields = [
        ("state", f"{job['state']} (wanted {job['desired_state']})"),
        ("progress", job["progress"] or "-"),
        ("error", one_line(job["error"] or "-")),
        ("attempts", attempts(job)),
        ("address", f"{job['host']}:{job['port']}" if job["host"] else "-"),
        ("agent", job["agent_url"] or "-"), ("spec", json.dumps(job["spec"])),
        *(("warning", warning_text(w)) for w in job.get("warnings") or []),
        ("created", when(job["created_at"])), ("last active", when(job["last_active"])),
        ("connect", command), ("", note),
    ]
    print(f"job {job['id']}")
    for k, v in fields:
        print(f"  {k + ':' if k else '':<13}{v}")
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
    job = client.call("POST", f"/v1/jobs/{seg(job_id(args.id))}/{args.verb}",
                      query=wait_query(args), timeout=socket_timeout(args))
    wanted = ACTIONS[args.verb]
    note = "" if job["state"] == wanted else f" (wanted {wanted})"
    print(f"job {job['id']}: {job['state']}{note}")
    return 0


def job_fork(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    body = {"id": job_id(args.new), **({"at": args.at} if args.at else {})}
    job = client.call("POST", f"/v1/jobs/{seg(job_id(args.source))}/fork", body=body,
                      query=wait_query(args), timeout=socket_timeout(args))
    for w in job.get("warnings") or []:
        print(f"warning: {warning_text(w)}", file=sys.stderr)
    what = f"as of {args.at}" if args.at else "latest"
    print(f"job {job['id']}: {job['state']} (a fork of {args.source}, {what})")
    if job["state"] == JobState.RUNNING:
        command, note = connect_lines(mesh, job["id"])
        print(f"connect: {command}\n         {note}")
    elif job.get("error"):
        print(f"error: {job['error']}", file=sys.stderr)
        return 1
    return 0


def job_restore(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("POST", f"/v1/jobs/{seg(job_id(args.id))}/restore",
                      body={"at": args.at}, query=wait_query(args),
                      timeout=socket_timeout(args) * 2)  # a pause, then a resume
    print(f"job {job['id']}: {job['state']} (rewound to {args.at}; the state it replaced is "
          "kept as a pinned pause snapshot for its point-in-time window)")
    if job.get("error"):
        print(f"error: {job['error']}", file=sys.stderr)
        return 1
    return 0


def job_retry(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("POST", f"/v1/jobs/{seg(job_id(args.id))}/retry", query=wait_query(args),
                      timeout=socket_timeout(args))
    wanted = job["desired_state"]
    note = "" if job["state"] == wanted else f" (wanted {wanted})"
    print(f"job {job['id']}: {job['state']}{note}")
    return 0


def job_delete(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("DELETE", f"/v1/jobs/{seg(job_id(args.id))}", query=wait_query(args),
                      timeout=socket_timeout(args))
    print(f"job {args.id}: deleted" if job is None else f"job {args.id}: {job['state']} "
          "(deletion requested)")
    return 0
