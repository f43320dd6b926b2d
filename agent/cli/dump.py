"""``agent dump`` and ``agent load``: logical dumps to and from the store.

The library half is ``jobmesh.agent.dump``, imported only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from ..progress import Progress
from . import add_store_arguments

if TYPE_CHECKING:
    from ..manifest import Manifest
    from . import Subparsers


class _ProgressOnceDataFlows(Progress):
    """A progress bar that appears with the first byte, so a failure to even start
    (a bad DSN, an unknown dump) stays one line on stderr."""

    def __init__(self, label: str) -> None:
        super().__init__(label, enabled=False)
        self._bar: Progress | None = None

    def advance(self, n: int) -> None:
        if self._bar is None:
            self._bar = Progress(self.label, self.total, stream=sys.stderr)
        self._bar.advance(n)

    def finish(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.finish(note)


def add_dump(sub: Subparsers) -> None:
    p = sub.add_parser("dump", help="stream pg_dump -Fc of a database to the store",
                       description="Stream `pg_dump -Fc` into the store (no local file); "
                                   "prints the dump id.")
    p.add_argument("--dsn", required=True, help="libpq connection string or URI")
    add_store_arguments(p)
    p.set_defaults(run=run_dump)


def add_load(sub: Subparsers) -> None:
    p = sub.add_parser("load", help="restore a stored dump into a database",
                       description="Stream a stored dump into `pg_restore --single-transaction`, "
                                   "verifying its sha256 before the transaction can commit.")
    p.add_argument("--dsn", required=True, help="libpq connection string or URI")
    add_store_arguments(p)
    p.add_argument("--dump", metavar="ID", help="the dump to load (default: the newest)")
    p.set_defaults(run=run_load)


def run_dump(args: argparse.Namespace) -> int:
    from ..dump import dump
    from ..store import open_store

    async def go() -> Manifest:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            return await dump(args.dsn, store, args.job,
                              progress=_ProgressOnceDataFlows(f"dump {args.job}"))
        finally:
            await store.close()

    print(asyncio.run(go()).id)
    return 0


def run_load(args: argparse.Namespace) -> int:
    from ..dump import load
    from ..store import open_store

    async def go() -> Manifest:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            return await load(args.dsn, store, args.job, dump_id=args.dump,
                              progress=_ProgressOnceDataFlows(f"load {args.job}"))
        finally:
            await store.close()

    asyncio.run(go())
    return 0


PARSERS = {"dump": add_dump, "load": add_load}
