"""``agent wal-push`` and ``agent wal-fetch``: one WAL file to or from the store.

``wal-fetch`` is Postgres's ``restore_command`` (see ``jobmesh.agent.wal``)
and runs once per segment during recovery: this module imports the WAL
library only when a command runs, and nothing else of the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AgentError
from . import add_store_arguments

if TYPE_CHECKING:
    from . import Subparsers

log = logging.getLogger("jobmesh.agent.wal")


def add_wal_push(sub: Subparsers) -> None:
    p = sub.add_parser("wal-push", help="upload one archived WAL file (archive_command style)")
    add_store_arguments(p)
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(run=run_push)


def add_wal_fetch(sub: Subparsers) -> None:
    p = sub.add_parser("wal-fetch", help="download one WAL file (for restore_command)")
    add_store_arguments(p)
    p.add_argument("walfile", metavar="WALFILE", help="the name Postgres asks for (%%f)")
    p.add_argument("dest", type=Path, metavar="DEST", help="where to put it (%%p)")
    p.set_defaults(run=run_fetch)


def run_push(args: argparse.Namespace) -> int:
    from ..store import open_store
    from ..wal import push_segment

    async def go() -> str:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            return await push_segment(store, args.job, args.file)
        finally:
            await store.close()

    if not args.file.is_file():
        raise AgentError(f"{args.file} is not a file")
    outcome = asyncio.run(go())
    log.info("%s %s", args.file.name, outcome)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from ..store import NotFound, open_store
    from ..wal import fetch_segment

    async def go() -> None:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            await fetch_segment(store, args.job, args.walfile, args.dest)
        finally:
            await store.close()

    try:
        asyncio.run(go())
    except NotFound:
        # Routine during recovery: Postgres probes for the next segment and newer
        # timelines. One line, exit 1, and recovery moves on.
        print(f"wal-fetch: {args.walfile} is not archived", file=sys.stderr)
        return 1
    return 0


PARSERS = {"wal-push": add_wal_push, "wal-fetch": add_wal_fetch}
