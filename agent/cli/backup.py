"""``agent snapshot``, ``agent restore`` and ``agent base-backup``: PGDATA to and from the store.

The library halves are ``jobmesh.agent.snapshot``, ``.restore`` and
``.basebackup``; each is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AgentError
from ..progress import Progress
from . import add_store_arguments

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..restore import RestoreResult
    from . import Subparsers


# --- snapshot ---------------------------------------------------------------------------


def add_snapshot(sub: Subparsers) -> None:
    p = sub.add_parser("snapshot", help="upload a pause snapshot of a stopped PGDATA",
                       description="Stream a cleanly stopped PGDATA to the store as tar.zst; "
                                   "prints the snapshot id.")
    p.add_argument("--pgdata", required=True, type=Path, metavar="DIR",
                   help="the cleanly stopped PGDATA to upload")
    add_store_arguments(p)
    p.set_defaults(run=run_snapshot)


def run_snapshot(args: argparse.Namespace) -> int:
    manifest = asyncio.run(_snapshot(args))
    print(manifest.id)
    return 0


async def _snapshot(args: argparse.Namespace) -> Manifest:
    from ..snapshot import check_stopped_pgdata, take_snapshot
    from ..store import open_store

    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    try:
        await asyncio.to_thread(check_stopped_pgdata, args.pgdata)  # a refusal is the only line
        progress = Progress(f"snapshot {args.pgdata}", stream=sys.stderr)
        return await take_snapshot(args.pgdata, store, args.job, progress=progress)
    finally:
        await store.close()


# --- restore ----------------------------------------------------------------------------


def add_restore(sub: Subparsers) -> None:
    p = sub.add_parser("restore", help="restore PGDATA from a snapshot or base backup",
                       description="Restore a job's newest (or the given) snapshot into an "
                                   "empty PGDATA; a base backup is set up to replay archived "
                                   "WAL at the next start.")
    p.add_argument("--pgdata", required=True, type=Path, metavar="DIR",
                   help="where to restore (must be empty or missing)")
    p.add_argument("--from", dest="snapshot", default="latest", metavar="latest|ID",
                   help="the snapshot to restore (default: the newest that verifies)")
    p.add_argument("--target-time", metavar="T",
                   help="recover to this time (ISO 8601; needs a base backup taken before T)")
    p.add_argument("--generation", type=int, default=0, metavar="N",
                   help="the incarnation's generation, from the catalog: claimed in the store "
                        "first; a newer claim is an error (default 0: unfenced)")
    add_store_arguments(p)
    p.set_defaults(run=run_restore)


def run_restore(args: argparse.Namespace) -> int:
    if args.generation < 0:
        raise AgentError("--generation must be >= 0")
    result = asyncio.run(_restore(args))
    m = result.manifest
    how = ("archived WAL will be replayed at the next start"
           + (f", up to {args.target_time}" if args.target_time else "")
           if result.recovery_configured else "ready to start")
    print(f"restored {m.kind} snapshot {m.id} into {args.pgdata}: {how}")
    return 0


async def _restore(args: argparse.Namespace) -> RestoreResult:
    from ..restore import restore
    from ..store import open_store

    store = open_store(args.store, s3_endpoint=args.s3_endpoint)
    try:
        def bar(m: Manifest, size: int) -> Progress:
            return Progress(f"restore {m.kind} snapshot {m.id}", total=size, stream=sys.stderr)

        return await restore(args.pgdata, store, args.job, snapshot_id=args.snapshot,
                             target_time=args.target_time, s3_endpoint=args.s3_endpoint,
                             progress=bar, generation=args.generation)
    finally:
        await store.close()


# --- base-backup ------------------------------------------------------------------------


def add_base_backup(sub: Subparsers) -> None:
    p = sub.add_parser("base-backup", help="back up a running PostgreSQL (needs archived WAL)",
                       description="Take a base backup of a running server; prints its id.")
    p.add_argument("--dsn", required=True,
                   help="postgresql:// URI of the server, as a superuser")
    p.add_argument("--pgdata", required=True, type=Path, metavar="DIR",
                   help="the server's PGDATA (for its pg_control and configuration)")
    add_store_arguments(p)
    p.set_defaults(run=run_base_backup)


def run_base_backup(args: argparse.Namespace) -> int:
    from ..basebackup import take_base_backup
    from ..store import open_store

    async def go() -> Manifest:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            progress = Progress(f"base backup {args.pgdata}", stream=sys.stderr)
            return await take_base_backup(args.dsn, args.pgdata, store, args.job,
                                          progress=progress)
        finally:
            await store.close()

    print(asyncio.run(go()).id)
    return 0


PARSERS = {"snapshot": add_snapshot, "restore": add_restore, "base-backup": add_base_backup}
