"""The ``jobmesh`` console script: one entry point, a subcommand per role.

Subcommands import their component lazily, so ``jobmesh router`` never loads
the controller's dependencies and a bad flag fails fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobmesh import logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jobmesh", description=__doc__.splitlines()[0])
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", default="INFO", choices=levels)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from router import main as router_main

    p = sub.add_parser("router", help="run the Postgres-wire router")
    router_main.add_arguments(p)
    p.set_defaults(run=router_main.run)

    from agent import cli as agent_cli

    p = sub.add_parser("agent", help="the sidecar beside a job's PostgreSQL: WAL, snapshots")
    agent_cli.add_arguments(p)

    from jobmesh import demo

    p = sub.add_parser("demo", help="a demo PostgreSQL behind the router (what `make up` runs)")
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # workers re-run the same command
    logs.setup(args.log_level)
    from agent.errors import AgentError
    from agent.store import StoreError
    from router.main import UsageError

    name = " ".join(filter(None, [args.command, getattr(args, "agent_command", None)]))
    try:
        code = args.run(args)
    except UsageError as exc:
        print(f"jobmesh {name}: {exc}", file=sys.stderr)
        sys.exit(2)
    except (AgentError, StoreError) as exc:
        print(f"jobmesh {name}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a last resort: one line, details only at DEBUG
        logging.getLogger("jobmesh").debug("unhandled error", exc_info=True)
        print(f"jobmesh {name}: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
