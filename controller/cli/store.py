"""``jobmesh store gc|usage``: collect the store's garbage now; what each job holds."""

from __future__ import annotations

import argparse

from ..mesh import MeshInfo
from .client import Client
from .formats import print_data
from .output import mb, table


def store_gc(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    body: dict[str, object] = {"dry_run": bool(args.dry_run)}
    if args.job:
        body["jobs"] = list(args.job)
    report = client.call("POST", "/v1/store/gc", body=body, timeout=3600)
    if print_data(report, args.output):
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"retention over {report['jobs']} jobs: {len(report['dropped_snapshots'])} snapshots "
          f"dropped, {report['deleted_keys']} keys {verb} (manifests, WAL, orphans)")
    for snap in report["dropped_snapshots"][:20]:
        print(f"  {snap}")
    print(f"objects: {report['objects']} stored, {report['referenced']} referenced by "
          f"{'kept ' if not args.dry_run else ''}manifests; {verb} {report['deleted_objects']} "
          f"({mb(report['deleted_bytes'])})")
    print(f"incomplete uploads {'to remove' if args.dry_run else 'removed'}: "
          f"{report['incomplete']}")
    if report["deferred"]:
        print(f"deferred: {report['deferred']}")
    return 0


def store_usage(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    body = client.call("GET", "/v1/store/usage")
    if print_data(body, args.output):
        return 0
    rows = [(job, str(u["snapshots"]), mb(u["unique"]), mb(u["shared"]), mb(u["wal"]),
             mb(u["other"])) for job, u in body["jobs"].items()]
    table([("JOB", "SNAPSHOTS", "UNIQUE", "SHARED", "WAL", "OTHER"), *rows])
    return 0
