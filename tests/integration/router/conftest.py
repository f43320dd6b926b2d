"""Fixtures of the router's tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from jobmesh.agent.postgres import Instance, free_port
from tests.support.catalog_harness import CatalogRouters, make_job_databases
from tests.support.router import RouterFactory, RouterProcess, routes_toml


@pytest.fixture
def metrics_router(router_factory: RouterFactory, pg) -> RouterProcess:
    """A router in front of ``pg`` serving Prometheus metrics on ``.metrics_port``."""
    port = free_port()
    r = router_factory(routes_toml(pg), "--metrics", f"127.0.0.1:{port}")
    r.metrics_port = port  # type: ignore[attr-defined]
    return r


# --- routers on the catalog ---------------------------------------------------------------


@pytest.fixture(scope="module")
def job_pg(pg_factory) -> Instance:
    """A job's PostgreSQL, shaped as agent init makes it (one per test module)."""
    inst = pg_factory(f"router-catalog-{os.urandom(3).hex()}", databases=())
    make_job_databases(inst)
    return inst


@pytest.fixture
def routers() -> Iterator[CatalogRouters]:
    """Routers on the catalog, stopped after the test; none may have logged a traceback."""
    factory = CatalogRouters()
    yield factory
    lines = factory.stop_all()
    if os.environ.get("JOBMESH_SHOW_ROUTER_LOG"):
        print("\n".join(lines))
    assert not [line for line in lines if "Traceback" in line or "never retrieved" in line]
