"""``jobmesh agent ...``: the agent's subcommands.

Each command lives in its own module, which registers its subparser through
``add_cli(subparsers)`` and sets ``run`` (a function of the parsed args
returning an exit status). Errors a user can act on are ``AgentError`` or
``StoreError``: the dispatcher prints them as one line and exits 1.
"""

from __future__ import annotations

import argparse
import importlib

# command name -> module that registers it (in the order `--help` lists them)
COMMANDS = {
    "init": "jobmesh.agent.init",
    "serve": "jobmesh.agent.sidecar.serve",
    "snapshot": "jobmesh.agent.snapshot",
    "restore": "jobmesh.agent.restore",
    "wal-push": "jobmesh.agent.wal",
    "wal-fetch": "jobmesh.agent.wal",
    "base-backup": "jobmesh.agent.basebackup",
    "dump": "jobmesh.agent.dump",
    "load": "jobmesh.agent.dump",
    "list": "jobmesh.agent.inventory",
    "verify": "jobmesh.agent.inventory",
    "prune": "jobmesh.agent.inventory",
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
    modules = [COMMANDS[wanted]] if wanted in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # not every command exists yet while the agent is being built
        module.add_cli(sub)
