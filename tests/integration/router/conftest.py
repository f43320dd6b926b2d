"""Fixtures of the router's tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from jobmesh.agent.postgres import free_port
from tests.support.router import RouterFactory, RouterProcess, routes_toml


@pytest.fixture
def metrics_router(router_factory: RouterFactory, pg) -> RouterProcess:
    """A router in front of ``pg`` serving Prometheus metrics on ``.metrics_port``."""
    port = free_port()
    r = router_factory(routes_toml(pg), "--metrics", f"127.0.0.1:{port}")
    r.metrics_port = port  # type: ignore[attr-defined]
    return r
