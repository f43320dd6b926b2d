"""``jobmesh agent ...``: the agent's subcommands, and nothing but the command line.

The domain modules (``init``, ``snapshot``, ``wal``...) know nothing of
argparse; a module here per group of commands defines their flags and turns
parsed arguments into calls. Only the chosen command's module is imported,
and it imports the library it calls only once the command runs:
``wal-fetch`` starts once per WAL segment during recovery, so its start-up
time matters, and ``--help`` should not load aiohttp or asyncpg.

Each module maps command names to functions that register a subparser
(``PARSERS``), and every subparser sets ``run`` (a function of the parsed
arguments returning an exit status). Errors a user can act on are
``AgentError`` or ``StoreError``: the dispatcher prints them as one line and
exits 1.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    # what each module's registration functions take (a generic only to type checkers)
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

# command name -> module of this package that defines it (in the order `--help` lists them)
COMMANDS = {
    "init": "init",
    "serve": "serve",
    "host": "serve",
    "snapshot": "backup",
    "restore": "backup",
    "wal-push": "wal",
    "wal-fetch": "wal",
    "base-backup": "backup",
    "dump": "dump",
    "load": "dump",
    "list": "inventory",
    "verify": "inventory",
    "prune": "inventory",
}


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """--store and --job (and --s3-endpoint) shared by every store-facing command."""
    p.add_argument("--store", required=True, metavar="URL",
                   help="file:///abs/path or s3://bucket/prefix")
    p.add_argument("--job", required=True, metavar="ID", help="the job's prefix in the store")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="S3 API endpoint (default: AWS_ENDPOINT_URL or AWS)")


def add_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Register the agent's commands; with ``argv`` naming one, import only its module."""
    sub = parser.add_subparsers(dest="agent_command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv or [] if not a.startswith("-")), None)
    for name in [wanted] if wanted in COMMANDS else list(COMMANDS):
        module = importlib.import_module(f"{__name__}.{COMMANDS[name]}")
        module.PARSERS[name](sub)
