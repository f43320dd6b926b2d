"""Shared fixtures: real PostgreSQL 15 instances and real router processes.

Every server a fixture starts is stopped in its finaliser, even when the
test fails. Nothing here sleeps to wait: readiness is a log line or
pg_ctl's own wait.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobmesh.agent.postgres import Instance, bin_dir, free_port, give_to_postgres

SUPERUSER_PASSWORD = "pw"

# psql and pgbench come with the server binaries; use those even where no
# Debian client package put them on PATH.
os.environ["PATH"] = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def pg_root() -> Iterator[Path]:
    """A scratch directory the postgres OS user can enter (pytest's tmp is 0700 root)."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-test-"))
    root.chmod(0o755)
    give_to_postgres(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture(scope="session")
def pg_factory(pg_root: Path) -> Iterator[PgFactory]:
    factory = PgFactory(pg_root)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def pg(pg_factory: PgFactory) -> Instance:
    """The shared PostgreSQL 15 (SCRAM over TCP) with database job_alpha."""
    return pg_factory("shared")


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


@dataclass
class RouterProcess:
    """A ``jobmesh router`` subprocess, with its log lines readable as they arrive."""

    proc: subprocess.Popen[str]
    routes_path: Path
    port: int = 0
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """Block until a log line matches; fails the test with the log if it never does."""
        regex = re.compile(pattern)
        for line in self.seen:
            if m := regex.search(line):
                self.seen.remove(line)
                return m
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"router never logged {pattern!r}; log:\n" +
                                     "\n".join(self.seen)) from None
            if m := regex.search(line):
                return m
            self.seen.append(line)

    def dsn(self, user: str = "alice", password: str = "s3cret", dbname: str = "job_alpha",
            **extra: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} user={user} password={password} "
                 f"dbname={dbname}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RouterFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.routers: list[RouterProcess] = []

    def __call__(self, routes: str, *args: str, wait: bool = True) -> RouterProcess:
        path = self.tmp / f"routes-{len(self.routers)}.toml"
        path.write_text(routes)
        cmd = [sys.executable, "-m", "jobmesh", "router", "--listen", "127.0.0.1:0",
               "--routes", str(path), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        router = RouterProcess(proc, path)
        self.routers.append(router)
        threading.Thread(target=_pump, args=(proc, router.lines), daemon=True).start()
        if wait:
            m = router.wait_for_log(r"router listening on [\d.]+:(\d+)")
            router.port = int(m.group(1))
        return router

    def stop_all(self) -> None:
        for r in self.routers:
            r.stop()


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.put(line.rstrip("\n"))


@pytest.fixture
def router_factory(tmp_path: Path) -> Iterator[RouterFactory]:
    factory = RouterFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def router(router_factory: RouterFactory, pg: Instance) -> RouterProcess:
    """A router in front of ``pg``: alice may use job alpha, bob nothing."""
    return router_factory(routes_toml(pg))


@pytest.fixture(scope="session")
def tls_ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(tls_ca, tmp_path_factory) -> dict[str, Path]:
    """Server certificate for 127.0.0.1/localhost, its key, and the CA, as files."""
    d = tmp_path_factory.mktemp("tls")
    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    paths = {"cert": d / "server.crt", "key": d / "server.key", "ca": d / "ca.crt"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    tls_ca.cert_pem.write_to_path(str(paths["ca"]))
    return paths


# --- object storage --------------------------------------------------------------


@dataclass
class S3Server:
    """moto's S3 API server on loopback; ``env`` holds what a client needs."""

    endpoint: str
    proc: subprocess.Popen[bytes]

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> str:
        import boto3  # moto depends on it; test setup only

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API (moto in server mode) on a free loopback port, for the whole session."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    # Its request log is not read: a pipe nobody drains would block moto after ~64 KiB.
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc)
        server = S3Server(f"http://127.0.0.1:{port}", proc)
        for k, v in server.env.items():
            os.environ.setdefault(k, v)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Block until something accepts on the port (a connect either succeeds or is refused)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            # Not listening yet: wait on the process for a moment instead of sleeping blindly.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
    raise RuntimeError("moto_server did not start listening")


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, pg_root: Path):
    """An empty store of each kind; the file one where the postgres user can read it
    (restore_command runs wal-fetch as that user). Test files may define their own."""
    from jobmesh.agent.store import open_store

    if request.param == "file":
        root = pg_root / f"store-{os.urandom(4).hex()}"
        root.mkdir()
        root.chmod(0o755)
        s = open_store(f"file://{root}")
    else:
        server = request.getfixturevalue("s3_server")
        bucket = server.create_bucket(f"store-{os.urandom(4).hex()}")
        s = open_store(f"s3://{bucket}/jobs", s3_endpoint=server.endpoint)
    yield s
    await s.close()


@pytest.fixture(scope="session")
def catalog_pg(pg_factory: PgFactory) -> Instance:
    """One PostgreSQL for catalogs; each test gets its own database in it."""
    return pg_factory("catalog", databases=())


@pytest.fixture
def catalog_dsn(catalog_pg: Instance) -> Iterator[str]:
    """A fresh, empty catalog database (not yet migrated), dropped afterwards."""
    name = f"catalog_{os.urandom(4).hex()}"
    catalog_pg.psql(f"CREATE DATABASE {name}")
    yield (f"postgresql://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{catalog_pg.port}/{name}")
    catalog_pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def catalog(catalog_dsn: str):
    """A migrated catalog, connected."""
    from jobmesh.controller.catalog.db import Catalog

    cat = await Catalog.connect(catalog_dsn)
    await cat.migrate()
    yield cat
    await cat.close()
