"""``agent init``: a new job's PGDATA, archiving into a spool (see ``jobmesh.agent.init``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from jobmesh.defaults import ARCHIVE_TIMEOUT

from ..errors import AgentError

if TYPE_CHECKING:
    from . import Subparsers


def add_init(sub: Subparsers) -> None:
    p = sub.add_parser("init", help="create a job's PGDATA with WAL archiving into a spool")
    p.add_argument("--pgdata", required=True, type=Path, metavar="DIR",
                   help="the PGDATA to create (must not exist or be empty)")
    p.add_argument("--job", required=True, metavar="ID",
                   help="the job's id: its database is job_<ID>")
    p.add_argument("--spool", type=Path, metavar="DIR",
                   help="where Postgres archives WAL for the agent (default: <pgdata>.spool)")
    p.add_argument("--archive-timeout", type=int, default=ARCHIVE_TIMEOUT, metavar="S",
                   help="force a WAL segment switch after S seconds of activity: what a "
                        "lost machine may lose when `agent serve` does not stream WAL "
                        f"(default {ARCHIVE_TIMEOUT}; 0: off)")
    p.add_argument("--port", type=int, help="the port to write into postgresql.conf")
    p.add_argument("--role-password-env", metavar="VAR",
                   help="serve at once: the job's roles LOGIN with the password in environment "
                        "variable VAR, TCP from anywhere needs it (SCRAM), dblink and "
                        "postgres_fdw are created")
    p.set_defaults(run=run_init)


def run_init(args: argparse.Namespace) -> int:
    from ..init import default_spool, init_pgdata

    spool = args.spool or default_spool(args.pgdata)
    password = None
    if args.role_password_env is not None:
        password = os.environ.get(args.role_password_env)
        if not password:
            raise AgentError(f"--role-password-env: environment variable "
                             f"{args.role_password_env} is not set or empty")
    init_pgdata(args.pgdata, args.job, spool=spool, archive_timeout=args.archive_timeout,
                port=args.port, role_password=password)
    print(f"initialised {args.pgdata.absolute()} for job {args.job}; WAL spool {spool}")
    return 0


PARSERS = {"init": add_init}
