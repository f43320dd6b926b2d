"""``jobmesh demo``: a PostgreSQL and the router in front of it, on one machine.

Until the controller exists this is the main job ``make up`` runs: it
initialises a demo instance under the state directory (once), starts it,
routes ``job_demo`` to it, and prints the psql line to try.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
from pathlib import Path

import uvloop

from agent.postgres import Instance, PostgresError, free_port
from router.config import RouterConfig, UsageError
from router.routes import load_routes
from router.server import Router


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=os.environ.get("JOBMESH_STATE_DIR", ".jobmesh"))
    p.add_argument("--port", type=int, default=6432, help="router port")


def run(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve() / "demo"
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    instance = Instance(state / "pgdata", port=free_port(), settings={"fsync": "off"})
    backend_pw = _secret(state / "backend.password")
    user_pw = _secret(state / "demo.password")
    try:
        if not (instance.datadir / "PG_VERSION").exists():
            print("initialising the demo PostgreSQL ...", flush=True)
            instance.initdb(superuser_password=backend_pw)
            instance.start()
            instance.psql("CREATE DATABASE job_demo")
        else:
            instance.start()
    except PostgresError as exc:
        raise UsageError(f"cannot start the demo PostgreSQL in {instance.datadir}: {exc}") from exc
    routes_file = state / "routes.toml"
    routes_file.write_text(
        f'[jobs.demo]\nhost = "127.0.0.1"\nport = {instance.port}\n'
        f'user = "postgres"\npassword = "{backend_pw}"\n\n'
        f'[users.demo]\npassword = "{user_pw}"\njobs = ["demo"]\n'
    )
    try:
        uvloop.run(_serve(args.port, routes_file, user_pw))
    finally:
        instance.stop()
    return 0


async def _serve(port: int, routes_file: Path, user_pw: str) -> None:
    router = Router(RouterConfig(port=port), load_routes(routes_file))
    try:
        await router.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from exc
    print(
        "\njobmesh demo is up. Try:\n\n"
        f'  psql "postgresql://demo:{user_pw}@127.0.0.1:{router.port}/job_demo"\n\n'
        "Ctrl-C stops the router and the demo PostgreSQL.",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    router.config.shutdown_timeout = 5
    await router.shutdown()


def _secret(path: Path) -> str:
    if not path.exists():
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip()
