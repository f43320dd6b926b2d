"""The ``jobmesh`` console script: one entry point, a subcommand per role.

Subcommands import their component lazily, so ``jobmesh router`` never loads
the controller's dependencies and a bad flag fails fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from jobmesh import defaults, logs
from jobmesh.errors import CommandFailed, UsageError, one_line


def _router(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from jobmesh.router import main as router_main

    router_main.add_arguments(p)
    p.set_defaults(run=router_main.run)


def _agent(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from jobmesh.agent import cli as agent_cli

    agent_cli.add_arguments(p, argv)


def _controller(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from jobmesh.controller import main as controller_main

    controller_main.add_arguments(p)
    p.set_defaults(run=controller_main.run)


def _up(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from jobmesh import up

    up.add_arguments(p)
    p.set_defaults(run=up.run)


def _operator(command: str) -> Callable[[argparse.ArgumentParser, list[str]], None]:
    """The operator commands talk to a running mesh's API (controller/cli/)."""

    def register(p: argparse.ArgumentParser, argv: list[str]) -> None:
        from jobmesh.controller.cli import main as operator_cli

        operator_cli.add_arguments(command, p)
    return register


COMMANDS = {
    "up": ("everything on one machine: catalog, controller, router, store", _up),
    "job": ("create, list, show, pause, resume, end, delete, fork, restore, export and "
            "import jobs",
            _operator("job")),
    "user": ("create, list and delete the users clients log in as, and set their passwords",
             _operator("user")),
    "grant": ("let a user reach the jobs matching a pattern", _operator("grant")),
    "revoke": ("take a user's grant away", _operator("revoke")),
    "psql": ("psql into a job's database through the router, as the admin (or --user)",
             _operator("psql")),
    "status": ("the running mesh: jobs by state, users, the router's address",
               _operator("status")),
    "events": ("who did what, when: logins, users, grants, and every job's events",
               _operator("events")),
    "store": ("the snapshot store: collect its garbage now (gc), what each job holds (usage)",
              _operator("store")),
    "router": ("run the Postgres-wire router", _router),
    "controller": ("run the controller: reconciler, backend and HTTP API", _controller),
    "agent": ("the sidecar beside a job's PostgreSQL: WAL, snapshots, restore", _agent),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (``wal-fetch`` runs once per
    WAL segment during recovery, so start-up time matters); ``--help`` loads all."""
    parser = argparse.ArgumentParser(prog="jobmesh", description=__doc__.splitlines()[0])
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--version", action="version", version=f"jobmesh {_version()}")
    parser.add_argument("--log-level", default="INFO", choices=levels,
                        help="how much the components log (default INFO)")
    parser.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"the mesh's state directory, for every command (env "
                        f"{defaults.STATE_DIR_ENV}, default ./{defaults.DEFAULT_STATE_DIR}); "
                        "also accepted after the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted, rest = _split_command(argv)
    for name, (text, register) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if wanted is None or wanted == name:
            register(p, rest)
    return parser


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The subcommand named in argv (None if none) and the arguments after it."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--log-level", "--state-dir"):
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return (arg, argv[i + 1 :]) if arg in COMMANDS else (None, [])
    return None, []


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jobmesh")
    except PackageNotFoundError:
        return "(not installed)"


def _state_dir_first(argv: list[str]) -> list[str]:
    """``jobmesh --state-dir D COMMAND ...``: D becomes the state directory every command
    reads (through its environment variable, which each command's default comes from);
    the flag after the command still wins."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in COMMANDS:
            return out + argv[i:]
        if arg == "--state-dir" and i + 1 < len(argv):
            os.environ[defaults.STATE_DIR_ENV] = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--state-dir="):
            os.environ[defaults.STATE_DIR_ENV] = arg.split("=", 1)[1]
            i += 1
            continue
        step = 2 if arg == "--log-level" else 1
        out += argv[i : i + step]
        i += step
    return out


def main(argv: list[str] | None = None) -> None:
    argv = _state_dir_first(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv)
    if not argv:  # bare `jobmesh`: the help, as kubectl does
        parser.print_help()
        sys.exit(0)
    args = parser.parse_args(argv)
    args.argv = argv  # router workers re-run the same command
    logs.setup(args.log_level)
    from jobmesh.agent.errors import AgentError
    from jobmesh.agent.store import StoreError

    name = " ".join(filter(None, [args.command, getattr(args, "agent_command", None)]))
    try:
        code = args.run(args)
    except UsageError as exc:
        print(f"jobmesh {name}: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except (CommandFailed, AgentError, StoreError) as exc:
        print(f"jobmesh {name}: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a last resort: one line, details only at DEBUG
        logging.getLogger("jobmesh").debug("unhandled error", exc_info=True)
        print(f"jobmesh {name}: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
