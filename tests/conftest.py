"""Fixtures only: each wires a helper from tests/support (real PostgreSQL 15 instances,
routers, moto S3, stores, the mesh on either backend) into pytest.

Every server a fixture starts is stopped in its finaliser, even when the
test fails. Nothing here sleeps to wait: readiness is a log line or
pg_ctl's own wait."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobmesh.agent.postgres import Instance, give_to_postgres
from jobmesh.agent.store import Store
from jobmesh.controller.catalog.db import Catalog
from tests.support.cleanup import remove_later
from tests.support.failure_logs import CALL_REPORT, tell_if_failed
from tests.support.kube_mesh import KubeMesh, running_kube_mesh
from tests.support.mesh import ROUTER_PASSWORD, Mesh, pids_mentioning
from tests.support.postgres import SUPERUSER_PASSWORD, PgFactory
from tests.support.router import RouterFactory, RouterProcess, routes_toml
from tests.support.s3 import S3Server, running_s3_server
from tests.support.stores import StoreSpec, new_store_spec
from tests.support.template_store import build_template_store, seed_store


@pytest.fixture(scope="session")
def pg_root() -> Iterator[Path]:
    """A scratch directory the postgres OS user can enter (pytest's tmp is 0700 root)."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-test-"))
    root.chmod(0o755)
    give_to_postgres(root)
    yield root
    # Local backends' agent hosts run in sessions of their own and outlive their backends.
    for pid in pids_mentioning(str(root)):
        with contextlib.suppress(OSError):
            if b"agent-host.json" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    remove_later(root)


@pytest.fixture(scope="session")
def pg_factory(pg_root: Path) -> Iterator[PgFactory]:
    factory = PgFactory(pg_root)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def pg(pg_factory: PgFactory) -> Instance:
    """The shared PostgreSQL 15 (SCRAM over TCP) with database job_alpha."""
    return pg_factory("shared")


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


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API (moto in server mode) on a free loopback port, for the whole session."""
    with running_s3_server() as server:
        for k, v in server.env.items():
            os.environ.setdefault(k, v)
        yield server


@pytest.fixture(scope="session")
def iam_s3_server() -> Iterator[S3Server]:
    """Another moto server, which checks every request against IAM policies as AWS does
    (``S3Server.enforce_iam``): for scoped store credentials."""
    with running_s3_server(iam=True) as server:
        yield server


@pytest.fixture(params=["file", "s3"])
def store_spec(request: pytest.FixtureRequest, pg_root: Path) -> StoreSpec:
    """An empty store of each kind, reachable in-process and from a CLI subprocess."""
    return new_store_spec(request, request.param, pg_root)


@pytest.fixture
def file_store(request: pytest.FixtureRequest, pg_root: Path) -> StoreSpec:
    """An empty file:// store."""
    return new_store_spec(request, "file", pg_root)


@pytest.fixture
async def store(store_spec: StoreSpec) -> AsyncIterator[Store]:
    """An empty store of each kind, open; the file one where the postgres user can read it."""
    s = store_spec.open()
    yield s
    await s.close()


@pytest.fixture
def restored_instances() -> Iterator[list[Instance]]:
    """Clusters started from restored PGDATA; all stopped at the end."""
    started: list[Instance] = []
    yield started
    for inst in started:
        inst.stop_quietly()


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
    """A migrated catalog, connected; its routers' role (migration 0008) may log in, as
    ``jobmesh up`` lets it (``tests.support.mesh.router_dsn``)."""
    cat = await Catalog.connect(catalog_dsn)
    await cat.migrate()
    await cat.pool.execute(f"ALTER ROLE jobmesh_router LOGIN PASSWORD '{ROUTER_PASSWORD}'")
    yield cat
    await cat.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """The call's report, kept where the fixtures' finalisers can see it failed."""
    report = yield
    if report.when == "call":
        item.stash[CALL_REPORT] = report
    return report


@pytest.fixture(scope="session")
def template_store(pg_root: Path) -> Path:
    """A store holding only the local backend's template, made once per session (worker)."""
    return build_template_store(pg_root / "template-store")


@pytest.fixture
async def mesh(request: pytest.FixtureRequest, pg_root: Path, catalog_dsn: str,
               catalog: Catalog, template_store: Path) -> AsyncIterator[Mesh]:
    """Catalog, router and (once a test starts it) a controller on the local backend."""
    root = pg_root / f"mesh-{os.urandom(4).hex()}"
    root.mkdir(mode=0o755)
    seed_store(template_store, root / "store")  # the controller's default store
    m = Mesh(root, catalog_dsn, catalog)
    try:
        yield m
    finally:
        await asyncio.to_thread(m.stop)
        tell_if_failed(request.node, root)
        remove_later(root)


@pytest.fixture
async def kube(request: pytest.FixtureRequest, pg_root: Path, catalog_dsn: str,
               catalog: Catalog, s3_server: S3Server) -> AsyncIterator[KubeMesh]:
    """The mesh on the Kubernetes backend (API emulator, test kubelet, moto store)."""
    async with running_kube_mesh(pg_root, catalog_dsn, catalog, s3_server) as k:
        try:
            yield k
        finally:
            tell_if_failed(request.node, k.mesh.root)
