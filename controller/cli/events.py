"""``jobmesh events``: who did what, when: the mesh's events (logins, users, grants) and
its jobs' (wants, transitions, errors), oldest first."""

from __future__ import annotations

import argparse
import json

from jobmesh.errors import one_line

from ..mesh import MeshInfo
from .client import Client
from .formats import print_data
from .output import WIDTH, table, when


def events(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    query = [f"limit={args.limit}"]
    if args.job:
        query.append(f"job={args.job}")
    if args.kind:
        query.append(f"kind={args.kind}")
    body = client.call("GET", "/v1/events?" + "&".join(query))
    if print_data(body, args.output):
        return 0
    rows = [("AT", "JOB", "KIND", "ACTOR", "WHAT")]
    for e in body["events"]:
        states = (f"{e['from_state'] or ''}->{e['to_state'] or ''}"
                  if e["from_state"] or e["to_state"] else "")
        detail = json.dumps(e["detail"]) if e["detail"] else ""
        rows.append((when(e["at"]), e["job_id"] or "-", e["kind"], e.get("actor") or "-",
                     one_line(" ".join(x for x in (states, detail) if x), WIDTH)))
    if len(rows) == 1:
        print("no events")
    else:
        table(rows)
    return 0
