"""``jobmesh router`` subprocesses for tests, and the route files they read."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from jobmesh.agent.postgres import Instance
from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.process import LoggedProcess


def routes_toml(pg: Instance, *, users: dict[str, tuple[str, list[str] | str]] | None = None,
                jobs: dict[str, dict[str, object]] | None = None) -> str:
    """A route file: job alpha -> ``pg``; users default to alice (alpha) and bob (no jobs)."""
    jobs = jobs if jobs is not None else {
        "alpha": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                  "password": SUPERUSER_PASSWORD},
    }
    users = users if users is not None else {
        "alice": ("s3cret", ["alpha"]),
        "bob": ("hunter2", []),
    }
    out = []
    for job_id, spec in jobs.items():
        out.append(f"[jobs.{job_id}]")
        for k, v in spec.items():
            out.append(f"{k} = {v!r}" if isinstance(v, int) else f'{k} = "{v}"')
        out.append("")
    for name, (password, granted) in users.items():
        out.append(f"[users.{name}]")
        out.append(f'password = "{password}"')
        out.append('jobs = "*"' if granted == "*" else f"jobs = {granted!r}".replace("'", '"'))
        out.append("")
    return "\n".join(out)


class RouterProcess(LoggedProcess):
    """A ``jobmesh router`` subprocess, with its log lines readable as they arrive."""

    def __init__(self, cmd: list[str], routes_path: Path,
                 env: dict[str, str] | None = None) -> None:
        super().__init__("router", cmd, env=env)
        self.routes_path = routes_path
        self.port = 0

    def wait_for_log(self, pattern: str, timeout: float = 20, *,
                     consume: bool = True) -> re.Match[str]:
        """Block until a log line matches; each matching line is returned once."""
        return super().wait_for_log(pattern, timeout, consume=consume)

    def dsn(self, user: str = "alice", password: str = "s3cret", dbname: str = "job_alpha",
            **extra: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} user={user} password={password} "
                 f"dbname={dbname}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def stop(self, timeout: float = 40) -> int:
        return super().stop(timeout)


class RouterFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.routers: list[RouterProcess] = []

    def __call__(self, routes: str, *args: str, wait: bool = True) -> RouterProcess:
        path = self.tmp / f"routes-{len(self.routers)}.toml"
        path.write_text(routes)
        cmd = [sys.executable, "-m", "jobmesh", "router", "--listen", "127.0.0.1:0",
               "--routes", str(path), *args]
        router = RouterProcess(cmd, path)
        self.routers.append(router)
        if wait:
            m = router.wait_for_log(r"router listening on [\d.]+:(\d+)")
            router.port = int(m.group(1))
        return router

    def stop_all(self) -> None:
        for r in self.routers:
            r.stop()
