"""``jobmesh status``: the running mesh at a glance (jobs by state, users, the router)."""

from __future__ import annotations

import argparse

from jobmesh.errors import one_line

from ..mesh import MeshInfo
from .client import Client
from .formats import print_data
from .output import WIDTH


def status(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    body = client.call("GET", "/v1/status")
    if print_data(body, args.output):
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
            extra = j["progress"] or (f"error: {one_line(j['error'], WIDTH)}" if j["error"] else "")
            print(f"  {j['id']}: {j['state']} -> {j['desired_state']}"
                  + (f" ({extra})" if extra else ""))
    return 0
