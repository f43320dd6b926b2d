"""The admin console of a router on the catalog: the catalog's stats principals may SHOW
and nothing else, its admins act, other users are refused at login."""

from __future__ import annotations

import psycopg
import pytest

from jobmesh.router.credentials import make_verifier
from tests.support.catalog_harness import PW, running_job

pytestmark = pytest.mark.timeout(120)


def _console(router, user: str) -> psycopg.Connection:
    return psycopg.connect(f"postgresql://{user}:{PW}@127.0.0.1:{router.port}/jobmesh",
                           connect_timeout=20, autocommit=True,
                           cursor_factory=psycopg.ClientCursor)


async def test_a_catalog_stats_principal_may_only_show(catalog, job_pg, routers):
    await running_job(catalog, job_pg)
    await catalog.create_principal("exporter", str(make_verifier(PW)), stats=True)
    await catalog.create_principal("root", str(make_verifier(PW)), admin=True)
    await catalog.create_principal("someone", str(make_verifier(PW)))
    router = await routers.start(catalog.dsn)
    with _console(router, "exporter") as conn:
        assert conn.execute("SHOW DATABASES").fetchall()
        for command in ("PAUSE job_alpha", "RELOAD", "SNAPSHOT_STOP job_alpha"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(command)
    with _console(router, "root") as conn:
        conn.execute("PAUSE job_alpha")
        conn.execute("RESUME job_alpha")
    with pytest.raises(psycopg.OperationalError, match="may not use the admin console"):
        _console(router, "someone")  # (42501, at login)
