"""``agent list``, ``agent verify`` and ``agent prune``: what a job has in the store, and upkeep.

The library halves are ``jobmesh.agent.inventory``, ``.verify`` and
``.prune``; the text ``list`` prints is made here.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import add_store_arguments

if TYPE_CHECKING:
    from ..inventory import Inventory
    from ..store import Store
    from . import Subparsers


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_inventory(inv: Inventory) -> str:
    lines = [f"job {inv.job} in {inv.store}", f"snapshots: {len(inv.snapshots)}"]
    for s in inv.snapshots:
        lsn = s.start_lsn + (f"..{s.end_lsn}" if s.end_lsn else "")
        wal = f"  wal {s.start_wal}..{s.end_wal}" if s.start_wal else ""
        lines.append(f"  {s.id}  {s.kind:<5}  {_mb(s.size):>11}  {s.created_at}  "
                     f"timeline {s.timeline}  lsn {lsn or '-'}{wal}")
    lines.append(f"dumps: {len(inv.dumps)}")
    for d in inv.dumps:
        lines.append(f"  {d.id}  {_mb(d.size):>11}  {d.created_at}  "
                     f"postgres {d.pg_version or '?'}")
    lines.append(f"WAL: {sum(r.segments for r in inv.wal)} segments")
    for r in inv.wal:
        gap = f", {r.missing} MISSING" if r.missing else ""
        lines.append(f"  timeline {r.timeline}: {r.first}..{r.last}  "
                     f"{r.segments} segments, {_mb(r.size)}{gap}")
    lines.append(f"orphaned objects: {len(inv.orphaned)} "
                 f"({_mb(sum(o.size for o in inv.orphaned))})")
    lines += [f"unreadable manifest: {k}" for k in inv.unreadable]
    return "\n".join(lines)


def add_list(sub: Subparsers) -> None:
    p = sub.add_parser("list", help="snapshots, dumps and WAL of a job in the store")
    add_store_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=lambda args: _run(_list, args))


def add_verify(sub: Subparsers) -> None:
    p = sub.add_parser("verify", help="re-download every stored object and check it",
                       description="Check every object a manifest lists (size and sha256) "
                                   "and that every WAL segment decompresses; exit 1 naming "
                                   "each bad object.")
    add_store_arguments(p)
    p.set_defaults(run=lambda args: _run(_verify, args))


def add_prune(sub: Subparsers) -> None:
    p = sub.add_parser("prune", help="delete all but the newest N snapshots and the WAL "
                                     "they do not need")
    add_store_arguments(p)
    p.add_argument("--keep", type=int, required=True, metavar="N",
                   help="snapshots to keep, pause and base backups counted together")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.set_defaults(run=lambda args: _run(_prune, args))


def _run(command: Callable[[Store, argparse.Namespace], Awaitable[int]],
         args: argparse.Namespace) -> int:
    from ..store import open_store

    async def go() -> int:
        store = open_store(args.store, s3_endpoint=args.s3_endpoint)
        try:
            return await command(store, args)
        finally:
            await store.close()

    return asyncio.run(go())


async def _list(store: Store, args: argparse.Namespace) -> int:
    from ..inventory import inventory

    inv = await inventory(store, args.job)
    print(inv.to_json() if args.json else format_inventory(inv))
    return 0


async def _verify(store: Store, args: argparse.Namespace) -> int:
    from ..verify import verify

    problems = await verify(store, args.job)
    for p in problems:
        print(p)
    if problems:
        print(f"jobmesh agent verify: {len(problems)} bad object(s) in job {args.job}",
              file=sys.stderr)
        return 1
    print(f"job {args.job}: every object verified")
    return 0


async def _prune(store: Store, args: argparse.Namespace) -> int:
    from ..prune import prune

    deleted = await prune(store, args.job, args.keep, dry_run=args.dry_run)
    for key in deleted:
        print(key)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(deleted)} object(s)", file=sys.stderr)
    return 0


PARSERS = {"list": add_list, "verify": add_verify, "prune": add_prune}
