"""``jobmesh psql JOB``: psql into a job's database through the router, as the admin or as
another user; and the connection line the other commands print for a job."""

from __future__ import annotations

import argparse
import os
import shutil
from urllib.parse import quote

from ..mesh import ADMIN_PASSWORD_FILE, MeshInfo
from .client import Client
from .command import OpsError, job_id

PASSWORD_PLACEHOLDER = "<password>"


def connect_lines(mesh: MeshInfo, job: str) -> tuple[str, str]:
    """How to reach ``job``: a psql command that works as printed once the admin's password
    replaces the placeholder, and where that password is (or the command that needs none)."""
    host = f"[{mesh.router_host}]" if ":" in mesh.router_host else mesh.router_host
    url = (f"postgresql://{quote(mesh.admin_user, safe='')}:{PASSWORD_PLACEHOLDER}@{host}:"
           f"{mesh.router_port}/job_{job}")
    where = mesh.state_dir.absolute() / ADMIN_PASSWORD_FILE
    return (f'psql "{url}"',
            f"{PASSWORD_PLACEHOLDER}: the admin's, in {where}; or: jobmesh psql {job}")


def psql(args: argparse.Namespace, mesh: MeshInfo, _client: Client) -> int:
    """Replace this process with psql, through the router: as the mesh's admin (its password
    from the state directory), or with ``--user NAME`` as NAME, for whom psql asks for the
    password as it always does (or takes PGPASSWORD, ~/.pgpass)."""
    database = f"job_{job_id(args.job)}"
    if args.user == "":
        raise OpsError("--user needs a NAME (hint: leave it out to connect as the admin)")
    binary = shutil.which("psql")
    if binary is None:
        from jobmesh.agent.postgres import PostgresError, bin_dir

        try:
            binary = str(bin_dir() / "psql")
        except PostgresError as exc:
            raise OpsError(f"psql not found: {exc}") from None
    env = {**os.environ, "PGHOST": mesh.router_host, "PGPORT": str(mesh.router_port),
           "PGDATABASE": database}
    if args.user is None:
        env.update(PGUSER=mesh.admin_user, PGPASSWORD=mesh.admin_password())
    else:
        env["PGUSER"] = args.user
    env.setdefault("PGAPPNAME", "jobmesh psql")
    try:
        os.execve(binary, ["psql", *args.psql_args], env)
    except OSError as exc:
        raise OpsError(f"cannot run {binary}: {exc.strerror}") from None
    return 1  # not reached: execve does not return
