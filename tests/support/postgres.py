"""Real PostgreSQL instances for tests: a factory that starts them and stops them all."""

from __future__ import annotations

import os
from pathlib import Path

from jobmesh.agent.postgres import Instance, bin_dir, free_port

SUPERUSER_PASSWORD = "pw"

# psql and pgbench come with the server binaries; use those even where no
# Debian client package put them on PATH.
os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"


class PgFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.instances: list[Instance] = []

    def __call__(self, name: str, *, auth_host: str = "scram-sha-256",
                 databases: tuple[str, ...] = ("job_alpha",), **settings: str) -> Instance:
        inst = Instance(self.root / name, port=free_port(),
                        settings={"fsync": "off", "max_connections": "300", **settings})
        inst.initdb(superuser_password=SUPERUSER_PASSWORD, auth_host=auth_host)
        if auth_host == "md5":
            inst.settings["password_encryption"] = "md5"
        self.instances.append(inst)
        inst.start()
        if auth_host == "md5":
            inst.psql(f"ALTER ROLE postgres PASSWORD '{SUPERUSER_PASSWORD}'")
        for db in databases:
            inst.psql(f"CREATE DATABASE {db}")
        return inst

    def stop_all(self) -> None:
        for inst in self.instances:
            inst.stop_quietly()
