"""The operator commands over the controller's API: ``jobmesh job|user|grant|revoke|psql|status``.

Each finds the running mesh through its state directory (``--state-dir``,
``JOBMESH_STATE_DIR``, ``./.jobmesh``). Commands that change a job wait, by
default, until the controller has done it (the API's ``?wait=1``), so
``jobmesh job pause X`` returns when X is paused. Failures are one line on
stderr (the API's error and hint) and exit status 1; usage errors exit 2.

This module registers the commands and runs them; each lives in the module
named for what it acts on (``jobs``, ``transfer`` for export and import,
``users``, ``psql``, ``status``); ``formats`` prints ``-o json|yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jobmesh import defaults

from ..mesh import TOKEN_FILE, MeshError, MeshInfo, read_mesh
from .client import Client, RequestFailed
from .command import WAIT_TIMEOUT, Command, OpsError
from .events import events
from .formats import FORMATS
from .jobs import (
    ACTIONS,
    job_action,
    job_create,
    job_delete,
    job_fork,
    job_list,
    job_restore,
    job_retry,
    job_show,
    job_update,
)
from .psql import psql
from .status import status
from .store import store_gc, store_usage
from .transfer import job_export, job_import
from .users import grant, revoke, user_create, user_delete, user_list, user_passwd

# --- registering ------------------------------------------------------------------------


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: accepted before and after a subcommand (`job --state-dir D list` and
    # `job list --state-dir D`) without the subcommand's default hiding the other.
    p.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR",
                   help=f"the mesh's state directory (env {defaults.STATE_DIR_ENV}, "
                   f"default ./{defaults.DEFAULT_STATE_DIR})")


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


def _add_output(p: argparse.ArgumentParser) -> None:
    """``-o FORMAT`` (kubectl's), and ``--json``, which came first."""
    p.add_argument("-o", "--output", choices=FORMATS, default="table", metavar="FORMAT",
                   help="table (the default), wide (more columns), or the API's answer as "
                   "json or yaml")
    p.add_argument("--json", dest="output", action="store_const", const="json",
                   help="the same as -o json")


class _PsqlArgs(argparse.Action):
    """psql's arguments: all after JOB, but for a ``--user NAME`` right after JOB, which is
    ours (argparse leaves an option after JOB to the remainder)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        rest = list(values or [])
        if rest and (rest[0] == "--user" or rest[0].startswith("--user=")):
            if getattr(namespace, "user", None) is not None:
                parser.error("argument --user: given twice")
            if rest[0] == "--user":
                if len(rest) < 2:
                    parser.error("argument --user: expected one argument")
                namespace.user, rest = rest[1], rest[2:]
            else:
                namespace.user, rest = rest[0].partition("=")[2], rest[1:]
        setattr(namespace, self.dest, rest)


def add_arguments(command: str, p: argparse.ArgumentParser) -> None:
    """Register ``command`` (job, user, grant, revoke, psql, status, events or store) on
    ``p``."""
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
        access.add_argument("--read", dest="access", action="store_const", const="read",
                            help="log in as the jobs' reader: SELECT only")
        access.add_argument("--write", dest="access", action="store_const", const="write",
                            help="log in as the jobs' owner: read, write, create")
        p.set_defaults(run=_runs(grant))
    elif command == "revoke":
        p.add_argument("user", metavar="USER")
        p.add_argument("pattern", metavar="JOB_PATTERN")
        p.set_defaults(run=_runs(revoke))
    elif command == "psql":
        p.add_argument("--user", metavar="NAME",
                       help="connect as NAME, for whom psql asks the password (default: as "
                       "the admin, whose password it is given); before JOB or right after "
                       "it: `jobmesh psql JOB --user NAME -c 'select 1'`")
        p.add_argument("job", metavar="JOB")
        p.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="PSQL_ARGS",
                       action=_PsqlArgs,
                       help="passed on to psql (-c 'select 1', -f FILE, ...)")
        p.set_defaults(run=_runs(psql))
    elif command == "status":
        _add_output(p)
        p.set_defaults(run=_runs(status))
    elif command == "events":
        p.add_argument("--job", metavar="ID", help="only this job's events")
        p.add_argument("--kind", metavar="KIND",
                       help="only events of this kind (login, granted, desired, transition, "
                       "...)")
        p.add_argument("--limit", type=int, default=100, metavar="N",
                       help="the newest N (default 100, at most 10000)")
        _add_output(p)
        p.set_defaults(run=_runs(events))
    elif command == "store":
        sub = p.add_subparsers(dest="op", required=True, metavar="COMMAND")
        gc = sub.add_parser("gc", parents=[common],
                            help="apply retention and delete what no snapshot references, now")
        gc.add_argument("--job", action="append", metavar="ID",
                        help="apply only this job's retention (repeatable); objects are "
                        "collected store-wide either way")
        gc.add_argument("--dry-run", action="store_true", help="say what would go; delete "
                        "nothing")
        _add_output(gc)
        gc.set_defaults(run=_runs(store_gc))
        usage = sub.add_parser("usage", parents=[common],
                               help="what each job holds in the store: unique and shared bytes")
        _add_output(usage)
        usage.set_defaults(run=_runs(store_usage))
    else:
        raise ValueError(f"unknown operator command {command!r}")


def _add_pooling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool-mode", choices=("session", "transaction"),
                   help="session (default): a client keeps one server connection; "
                   "transaction: clients share --pool-size of them, one per transaction")
    p.add_argument("--pool-size", type=int, metavar="N",
                   help="server connections per router process (default: the router's, 20)")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="client connections to the job through all the routers together "
                   "(default: no limit)")


def _add_job(p: argparse.ArgumentParser, common: argparse.ArgumentParser,
             waiting: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="op", required=True, metavar="COMMAND")
    c = sub.add_parser("create", parents=[common, waiting], help="create a job")
    c.add_argument("id", metavar="ID")
    c.add_argument("--archive-timeout", type=int, metavar="S",
                   help="force a WAL segment switch after S seconds (0: never)")
    c.add_argument("--wal-window", type=float, metavar="S",
                   help="send the streamed WAL every S seconds: what a lost machine may lose "
                        f"(default {defaults.WAL_WINDOW:g}; 0: finished segments only)")
    c.add_argument("--keep-pauses", type=int, metavar="N",
                   help="pause snapshots to keep (default: the controller's, 3)")
    c.add_argument("--pitr-window", type=float, metavar="S",
                   help="seconds a point-in-time restore can reach back (default: the "
                        "controller's, 86400)")
    _add_pooling(c)
    c.add_argument("--cpu", help="CPU for the job's Postgres, e.g. 500m or 2")
    c.add_argument("--memory", help="memory, e.g. 1Gi")
    c.add_argument("--disk", help="disk, e.g. 10Gi")
    c.set_defaults(run=_runs(job_create))
    f = sub.add_parser("fork", parents=[common, waiting],
                       help="a new job from another's data (latest, or --at a time), sharing "
                       "its snapshot objects; the source is only read")
    f.add_argument("source", metavar="SRC")
    f.add_argument("new", metavar="NEW")
    f.add_argument("--at", metavar="TIME",
                   help="the source as it was at TIME (ISO 8601; UTC without an offset), "
                   "within its point-in-time window")
    f.set_defaults(run=_runs(job_fork))
    rs = sub.add_parser("restore", parents=[common, waiting],
                        help="rewind a job to a time within its point-in-time window (it is "
                        "paused first; the state it had stays as a pinned snapshot)")
    rs.add_argument("id", metavar="ID")
    rs.add_argument("--at", required=True, metavar="TIME",
                    help="ISO 8601 (UTC without an offset), e.g. 2026-12-01T10:00:00Z")
    rs.set_defaults(run=_runs(job_restore))
    u = sub.add_parser("update", parents=[common],
                       help="change how the router pools a job's connections (new "
                       "connections use it)")
    u.add_argument("id", metavar="ID")
    _add_pooling(u)
    u.set_defaults(run=_runs(job_update))
    ls = sub.add_parser("list", parents=[common], help="list jobs")
    _add_output(ls)
    ls.set_defaults(run=_runs(job_list))
    show = sub.add_parser("show", parents=[common], help="a job, its snapshots and events")
    show.add_argument("id", metavar="ID")
    _add_output(show)
    show.set_defaults(run=_runs(job_show))
    for verb, state in ACTIONS.items():
        a = sub.add_parser(verb, parents=[common, waiting], help=f"want the job {state}")
        a.add_argument("id", metavar="ID")
        a.set_defaults(run=_runs(job_action), verb=verb)
    r = sub.add_parser("retry", parents=[common, waiting],
                       help="try again what the controller gave up on (after fixing the cause)")
    r.add_argument("id", metavar="ID")
    r.set_defaults(run=_runs(job_retry))
    d = sub.add_parser("delete", parents=[common, waiting],
                       help="delete a job and everything stored of it")
    d.add_argument("id", metavar="ID")
    d.set_defaults(run=_runs(job_delete))
    e = sub.add_parser("export", parents=[common], help="download a pg_dump of the job")
    e.add_argument("id", metavar="ID")
    e.add_argument("-o", "--output", metavar="PATH",
                   help="a file, or DIR/ (an existing directory) for DIR/ID.pgdump "
                   "(default ./ID.pgdump)")
    e.add_argument("--force", action="store_true", help="replace the file if it exists")
    e.add_argument("--timeout", type=float, default=WAIT_TIMEOUT, metavar="S",
                   help="how long a paused job may take to wake")
    e.set_defaults(run=_runs(job_export))
    i = sub.add_parser("import", parents=[common, waiting],
                       help="create a job from a pg_dump -Fc file")
    i.add_argument("id", metavar="ID")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(run=_runs(job_import))


def _add_user(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="op", required=True, metavar="COMMAND")
    c = sub.add_parser("create", parents=[common], help="create a user (a client login)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--password-stdin", action="store_true",
                   help="read the password from stdin (default: generate one, shown once)")
    c.add_argument("--stats", action="store_true",
                   help="a stats principal: the router's admin console SHOW commands only "
                   "(PgBouncer's stats_users; an exporter's login)")
    c.set_defaults(run=_runs(user_create))
    pw = sub.add_parser("passwd", parents=[common],
                        help="give a user a new password (the old one stops working)")
    pw.add_argument("name", metavar="NAME")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from stdin (default: generate one, shown once)")
    pw.set_defaults(run=_runs(user_passwd))
    d = sub.add_parser("delete", parents=[common], help="delete a user and its grants")
    d.add_argument("name", metavar="NAME")
    d.set_defaults(run=_runs(user_delete))
    ls = sub.add_parser("list", parents=[common], help="users and their grants")
    _add_output(ls)
    ls.set_defaults(run=_runs(user_list))


def _runs(command: Command) -> Callable[[argparse.Namespace], int]:
    """The mesh and a client for ``command``; every failure as one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        name = " ".join(filter(None, ["jobmesh", args.command, getattr(args, "op", None)]))
        mesh: MeshInfo | None = None
        try:
            mesh = read_mesh(defaults.state_dir(getattr(args, "state_dir", None)))
            code = command(args, mesh, Client(mesh.api, mesh.token))
            sys.stdout.flush()  # a closed pipe fails here, where it is caught
            return code
        except RequestFailed as exc:
            print(f"{name}: {_refused_token(exc, mesh) or exc}", file=sys.stderr)
            return 1
        except (MeshError, OpsError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # `jobmesh job list | head -1`: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # as a shell reports SIGPIPE
    return run


def _refused_token(exc: RequestFailed, mesh: MeshInfo | None) -> str | None:
    """A 401 in the CLI's words: which token file, for which API (the API's own hint tells
    an HTTP client which header to send)."""
    if exc.status != 401 or mesh is None:
        return None
    return (f"{exc.error}: the API at {mesh.api} refused the one in "
            f"{mesh.state_dir.absolute() / TOKEN_FILE} (hint: is the mesh that answers there "
            "the one of this state directory? `jobmesh up` writes both)")
