"""``jobmesh psql JOB``: psql into a job's database through the router, as the admin."""

from __future__ import annotations

import argparse
import os
import shutil

from ..mesh import MeshInfo
from .client import Client
from .command import OpsError


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
