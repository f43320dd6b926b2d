"""The operator commands over the controller's API: ``jobmesh job|user|grant|revoke|psql|status``.

Each finds the running mesh through its state directory (``--state-dir``,
``JOBMESH_STATE_DIR``, ``./.jobmesh``). Commands that change a job wait, by
default, until the controller has done it (the API's ``?wait=1``), so
``jobmesh job pause X`` returns when X is paused. Failures are one line on
stderr (the API's error and hint) and exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jobmesh.agent.progress import Progress

from ..mesh import MeshError, MeshInfo, read_mesh, state_dir
from .client import Client, RequestFailed

WAIT_TIMEOUT = 600.0
DUMP_MAGIC = b"PGDMP"
ACTIONS = {"pause": "paused", "resume": "running", "end": "ended"}


class OpsError(Exception):
    """Bad input found before any request; one line for the user."""


# --- registering ------------------------------------------------------------------------


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: accepted before and after a subcommand (`job --state-dir D list` and
    # `job list --state-dir D`) without the subcommand's default hiding the other.
    p.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="the mesh's state directory (env JOBMESH_STATE_DIR, default ./.jobmesh)")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_state_dir(common)
    return common


def _waiting() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--no-wait", action="store_true",
                   help="return at once instead of when the controller has done it")
    p.add_argument("--timeout", type=float, default=WAIT_TIMEOUT, metavar="S",
                   help=f"how long to wait (default {WAIT_TIMEOUT:g} s)")
    return p


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    """Register ``command`` (job, user, grant, revoke, psql or status) on ``p``."""
    common, waiting = _common(), _waiting()
    _add_state_dir(p)
    if command == "job":
        _add_job(p, common, waiting)
    elif command == "user":
        _add_user(p, common)
    elif command == "grant":
        p.add_argument("user", metavar="USER")
        p.add_argument("pattern", metavar="JOB_PATTERN", help="a job id or a glob: 'scrape-*'")
        access = p.add_mutually_exclusive_group(required=True)
        access.add_argument("--read", dest="access", action="store_const", const="read")
        access.add_argument("--write", dest="access", action="store_const", const="write")
        p.set_defaults(run=_runs(grant))
    elif command == "revoke":
        p.add_argument("user", metavar="USER")
        p.add_argument("pattern", metavar="JOB_PATTERN")
        p.set_defaults(run=_runs(revoke))
    elif command == "psql":
        p.add_argument("job", metavar="JOB")
        p.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="PSQL_ARGS",
                       help="passed on to psql (-c 'select 1', -f FILE, ...)")
        p.set_defaults(run=_runs(psql))
    elif command == "status":
        p.add_argument("--json", action="store_true", help="the API's answer, as JSON")
        p.set_defaults(run=_runs(status))
    else:
        raise ValueError(f"unknown operator command {command!r}")


def _add_job(p: argparse.ArgumentParser, common: argparse.ArgumentParser,
             waiting: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="op", required=True, metavar="COMMAND")
    c = sub.add_parser("create", parents=[common, waiting], help="create a job")
    c.add_argument("id", metavar="ID")
    c.add_argument("--archive-timeout", type=int, metavar="S",
                   help="force a WAL switch after S seconds: bounds the data a crash loses")
    c.add_argument("--cpu", help="CPU for the job's Postgres, e.g. 500m or 2")
    c.add_argument("--memory", help="memory, e.g. 1Gi")
    c.add_argument("--disk", help="disk, e.g. 10Gi")
    c.set_defaults(run=_runs(job_create))
    ls = sub.add_parser("list", parents=[common], help="list jobs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_runs(job_list))
    show = sub.add_parser("show", parents=[common], help="a job, its snapshots and events")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_runs(job_show))
    for verb, state in ACTIONS.items():
        a = sub.add_parser(verb, parents=[common, waiting], help=f"want the job {state}")
        a.add_argument("id", metavar="ID")
        a.set_defaults(run=_runs(job_action), verb=verb)
    d = sub.add_parser("delete", parents=[common, waiting],
                       help="delete a job and everything stored of it")
    d.add_argument("id", metavar="ID")
    d.set_defaults(run=_runs(job_delete))
    e = sub.add_parser("export", parents=[common], help="download a pg_dump of the job")
    e.add_argument("id", metavar="ID")
    e.add_argument("-o", "--output", metavar="FILE", help="where to (default ID.pgdump)")
    e.add_argument("--timeout", type=float, default=WAIT_TIMEOUT, metavar="S",
                   help="how long a paused job may take to wake")
    e.set_defaults(run=_runs(job_export))
    i = sub.add_parser("import", parents=[common, waiting],
                       help="create a job from a pg_dump -Fc file")
    i.add_argument("id", metavar="ID")
    i.add_argument("file", metavar="FILE", type=Path)
    i.set_defaults(run=_runs(job_import))


def _add_user(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="op", required=True, metavar="COMMAND")
    c = sub.add_parser("create", parents=[common], help="create a user (a client login)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--password-stdin", action="store_true",
                   help="read the password from stdin (default: generate one, shown once)")
    c.set_defaults(run=_runs(user_create))
    d = sub.add_parser("delete", parents=[common], help="delete a user and its grants")
    d.add_argument("name", metavar="NAME")
    d.set_defaults(run=_runs(user_delete))
    ls = sub.add_parser("list", parents=[common], help="users and their grants")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_runs(user_list))


Command = Callable[[argparse.Namespace, MeshInfo, Client], int]


def _runs(command: Command) -> Callable[[argparse.Namespace], int]:
    """The mesh and a client for ``command``; every failure as one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        name = " ".join(filter(None, ["jobmesh", args.command, getattr(args, "op", None)]))
        try:
            mesh = read_mesh(state_dir(getattr(args, "state_dir", None)))
            return command(args, mesh, Client(mesh.api, mesh.token))
        except (MeshError, RequestFailed, OpsError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return run


def _wait_query(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.no_wait else {"wait": 1, "timeout": args.timeout}


def _timeout(args: argparse.Namespace) -> float:
    """The socket timeout: longer than the API's own wait, which answers 504 first."""
    return args.timeout + 30


def _seg(value: str) -> str:
    """One path segment, whatever the user typed ('a/b' must not reach another endpoint)."""
    return quote(value, safe="")


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2))


# --- jobs ---------------------------------------------------------------------------------


def job_create(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    spec = {k: v for k in ("archive_timeout", "cpu", "memory", "disk")
            if (v := getattr(args, k)) is not None}
    job = client.call("POST", "/v1/jobs", body={"id": args.id, "spec": spec},
                      query=_wait_query(args), timeout=_timeout(args))
    print(f"job {job['id']}: {job['state']}")
    if job["state"] == "running":
        print(f"connect: psql \"host={mesh.router_host} port={mesh.router_port} "
              f"dbname=job_{job['id']} user=<user>\" (or `jobmesh psql {job['id']}`)")
    return 0


def job_list(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    jobs = client.call("GET", "/v1/jobs")["jobs"]
    if args.json:
        _print_json(jobs)
        return 0
    if not jobs:
        print("no jobs yet: create one with `jobmesh job create ID`", file=sys.stderr)
        return 0
    rows = [("ID", "STATE", "DESIRED", "ADDRESS", "LAST ACTIVE", "ERROR")]
    rows += [(j["id"], j["state"], j["desired_state"],
              f"{j['host']}:{j['port']}" if j["host"] else "-", _when(j["last_active"]),
              _one_line(j["error"] or "")) for j in jobs]
    _table(rows)
    return 0


def job_show(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    job = client.call("GET", f"/v1/jobs/{_seg(args.id)}")
    if args.json:
        _print_json(job)
        return 0
    fields = [
        ("state", f"{job['state']} (wanted {job['desired_state']})"),
        ("progress", job["progress"] or "-"),
        ("error", " ".join((job["error"] or "-").split())),
        ("address", f"{job['host']}:{job['port']}" if job["host"] else "-"),
        ("agent", job["agent_url"] or "-"), ("spec", json.dumps(job["spec"])),
        ("created", _when(job["created_at"])), ("last active", _when(job["last_active"])),
        ("connect", f"host={mesh.router_host} port={mesh.router_port} dbname=job_{job['id']}"),
    ]
    print(f"job {job['id']}")
    for k, v in fields:
        print(f"  {k + ':':<13}{v}")
    if job["snapshots"]:
        print("snapshots:")
        _table([("ID", "KIND", "SIZE", "STORED", "CREATED")] + [
            (s["id"], s["kind"], _mb(s["size_bytes"]), _mb(s["stored_bytes"]),
             _when(s["created_at"])) for s in job["snapshots"]], indent="  ")
    if job["events"]:
        print("events (newest last):")
        _table([("AT", "KIND", "STATES", "TOOK", "BYTES", "DETAIL")] + [
            (_when(e["at"]), e["kind"],
             f"{e['from_state'] or ''}->{e['to_state'] or ''}" if e["from_state"] or
             e["to_state"] else "",
             f"{e['duration_ms'] / 1000:.1f}s" if e["duration_ms"] is not None else "",
             _mb(e["bytes"]), _one_line(json.dumps(e["detail"]) if e["detail"] else ""))
            for e in job["events"]], indent="  ")
    return 0


def job_action(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("POST", f"/v1/jobs/{_seg(args.id)}/{args.verb}", query=_wait_query(args),
                      timeout=_timeout(args))
    wanted = ACTIONS[args.verb]
    note = "" if job["state"] == wanted else f" (wanted {wanted})"
    print(f"job {job['id']}: {job['state']}{note}")
    return 0


def job_delete(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    job = client.call("DELETE", f"/v1/jobs/{_seg(args.id)}", query=_wait_query(args),
                      timeout=_timeout(args))
    print(f"job {args.id}: deleted" if job is None else f"job {args.id}: {job['state']} "
          "(deletion requested)")
    return 0


def job_export(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    out = Path(args.output or f"{args.id}.pgdump")
    partial = out.with_name(out.name + ".partial")
    bar = _Bar(f"exporting job {args.id}")

    def progress(total: int | None) -> Callable[[int], None]:
        bar.total = total
        return bar.advance

    try:
        with partial.open("wb") as f:
            got = client.download(f"/v1/jobs/{_seg(args.id)}/export", f,
                                  query={"timeout": args.timeout}, progress=progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
    except OSError as exc:
        raise OpsError(f"cannot write {exc.filename or out}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    bar.finish(f"dump {got.dump_id}")
    print(f"exported job {args.id} to {out} ({_mb(got.size)}, sha256 {got.sha256[:16]}...)")
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
        bar = _Bar(f"importing {args.file}", size)
        job = client.upload(f"/v1/jobs/{_seg(args.id)}/import", f, size, query=_wait_query(args),
                            timeout=_timeout(args), advance=bar.advance)
        bar.finish()
    print(f"job {job['id']}: {job['state']} (imported {_mb(size)})")
    return 0


def _must_be_new(client: Client, job_id: str) -> None:
    try:
        client.call("GET", f"/v1/jobs/{_seg(job_id)}")
    except RequestFailed as exc:
        if exc.status == 404:
            return
        raise
    raise OpsError(f"job {job_id} already exists (hint: pick another id, or delete the job "
                   "first)")


class _Bar:
    """A progress bar that appears with the first byte, so a request refused before any
    data flows stays one line on stderr."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label, self.total = label, total
        self._bar: Progress | None = None

    def advance(self, n: int) -> None:
        if self._bar is None:
            self._bar = Progress(self.label, self.total)
        self._bar.advance(n)

    def finish(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.finish(note)


# --- users and grants ---------------------------------------------------------------------


def user_create(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise OpsError("no password on stdin")
    else:
        password = secrets.token_urlsafe(18)
    client.call("POST", "/v1/users", body={"name": args.name, "password": password})
    print(f"created user {args.name}")
    if not args.password_stdin:
        print(f"password (shown once): {password}")
    return 0


def user_delete(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("DELETE", f"/v1/users/{_seg(args.name)}")
    print(f"deleted user {args.name}")
    return 0


def user_list(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    users = client.call("GET", "/v1/users")["users"]
    if args.json:
        _print_json(users)
        return 0
    rows = [("NAME", "ADMIN", "GRANTS")]
    rows += [(u["name"], "yes" if u["admin"] else "",
              ", ".join(f"{g['pattern']}:{g['access']}" for g in u["grants"]) or "-")
             for u in users]
    _table(rows)
    return 0


def grant(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("POST", "/v1/grants",
                body={"user": args.user, "pattern": args.pattern, "access": args.access})
    print(f"granted {args.user} {args.access} access to {args.pattern}")
    return 0


def revoke(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("DELETE", "/v1/grants", body={"user": args.user, "pattern": args.pattern})
    print(f"revoked {args.user}'s access to {args.pattern}")
    return 0


# --- the mesh -----------------------------------------------------------------------------


def psql(args: argparse.Namespace, mesh: MeshInfo, _client: Client) -> int:
    """Replace this process with psql, through the router, as the mesh's admin."""
    binary = shutil.which("psql")
    if binary is None:
        from jobmesh.agent.postgres import PostgresError, bin_dir

        try:
            binary = str(bin_dir() / "psql")
        except PostgresError as exc:
            raise OpsError(f"psql not found: {exc}") from None
    env = {**os.environ, "PGHOST": mesh.router_host, "PGPORT": str(mesh.router_port),
           "PGUSER": mesh.admin_user, "PGPASSWORD": mesh.admin_password(),
           "PGDATABASE": f"job_{args.job}"}
    env.setdefault("PGAPPNAME", "jobmesh psql")
    try:
        os.execve(binary, ["psql", *args.psql_args], env)
    except OSError as exc:
        raise OpsError(f"cannot run {binary}: {exc.strerror}") from None
    return 1  # not reached: execve does not return


def status(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    body = client.call("GET", "/v1/status")
    if args.json:
        _print_json(body)
        return 0
    router = body["router"] or {"host": mesh.router_host, "port": mesh.router_port}
    print(f"mesh under {mesh.state_dir}")
    print(f"  API:     {mesh.api}")
    print(f"  router:  {router['host']}:{router['port']} (dbname=job_<id>)")
    print(f"  users:   {body['users']}")
    jobs = body["jobs"]
    print(f"jobs: {jobs['total']}")
    for state, count in jobs["by_state"].items():
        print(f"  {state:<11}{count}")
    if jobs["unsettled"]:
        print("on the way:")
        for j in jobs["unsettled"]:
            extra = j["progress"] or (f"error: {_one_line(j['error'])}" if j["error"] else "")
            print(f"  {j['id']}: {j['state']} -> {j['desired_state']}"
                  + (f" ({extra})" if extra else ""))
    return 0


# --- formatting ---------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _when(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def _mb(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n:,} B"


def _one_line(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."
