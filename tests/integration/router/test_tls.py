"""TLS between clients and the router, with real psycopg and asyncpg clients.

The router terminates TLS (``--tls-cert/--tls-key``); ``--require-tls``
refuses cleartext startups with 28000. Over TLS it offers
SCRAM-SHA-256-PLUS, so ``channel_binding=require`` must work.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml

CONNECT_TIMEOUT = 10


@pytest.fixture
def tls_router(router_factory, pg, tls_files):
    return router_factory(routes_toml(pg), "--tls-cert", str(tls_files["cert"]),
                          "--tls-key", str(tls_files["key"]))


@pytest.fixture
def strict_router(router_factory, pg, tls_files):
    """A router that refuses clients without TLS."""
    return router_factory(routes_toml(pg), "--tls-cert", str(tls_files["cert"]),
                          "--tls-key", str(tls_files["key"]), "--require-tls")


@pytest.fixture
def wrong_ca_file(tmp_path):
    trustme = pytest.importorskip("trustme")
    path = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def _connect(router, **kwargs) -> psycopg.Connection:
    return psycopg.connect(router.dsn(), connect_timeout=CONNECT_TIMEOUT, **kwargs)


def _client_ssl(tls_files) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files["ca"]))


@pytest.mark.timeout(60)
def test_sslmode_require_uses_tls_to_the_router(tls_router):
    with _connect(tls_router, sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select current_database()").fetchone() == ("job_alpha",)


@pytest.mark.timeout(60)
def test_tls_router_still_serves_cleartext_clients_without_require_tls(tls_router):
    with _connect(tls_router, sslmode="disable") as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_verify_full_with_the_right_ca_succeeds(tls_router, tls_files, host):
    with _connect(tls_router, host=host, hostaddr="127.0.0.1", sslmode="verify-full",
                  sslrootcert=str(tls_files["ca"])) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select 42").fetchone() == (42,)


@pytest.mark.timeout(60)
def test_verify_full_with_a_wrong_ca_fails(tls_router, wrong_ca_file):
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _connect(tls_router, sslmode="verify-full", sslrootcert=str(wrong_ca_file))


@pytest.mark.timeout(60)
def test_large_copy_out_over_tls_arrives_intact(tls_router):
    query = ("select g, repeat(md5(g::text), 8) from generate_series(1, 60000) g")
    with _connect(tls_router, sslmode="require") as conn:
        digest, size = hashlib.md5(), 0
        with conn.cursor().copy(f"copy ({query}) to stdout") as copy:
            for chunk in copy:
                digest.update(chunk)
                size += len(chunk)
        expected = conn.execute(
            "select md5(string_agg(g || E'\\t' || repeat(md5(g::text), 8) || E'\\n', '' "
            "order by g)) from generate_series(1, 60000) g").fetchone()[0]
    assert size > 15_000_000
    assert digest.hexdigest() == expected


@pytest.mark.timeout(60)
def test_require_tls_refuses_sslmode_disable_with_28000(strict_router):
    with pytest.raises(psycopg.OperationalError) as info:
        _connect(strict_router, sslmode="disable")
    exc = info.value
    if exc.sqlstate is not None:
        assert exc.sqlstate == "28000"
    assert "TLS" in str(exc)
    assert "password authentication" not in str(exc)


@pytest.mark.timeout(60)
async def test_require_tls_refuses_asyncpg_cleartext_with_sqlstate_28000(strict_router):
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(host="127.0.0.1", port=strict_router.port, user="alice",
                              password="s3cret", database="job_alpha", ssl=False, timeout=10)
    assert info.value.sqlstate == "28000"
    assert "TLS" in str(info.value)


@pytest.mark.timeout(60)
def test_require_tls_accepts_sslmode_require(strict_router):
    with _connect(strict_router, sslmode="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("postgres",)


@pytest.mark.timeout(60)
def test_channel_binding_require_works_over_tls(tls_router, tls_files):
    with _connect(tls_router, sslmode="verify-full", sslrootcert=str(tls_files["ca"]),
                  channel_binding="require") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.timeout(60)
def test_channel_binding_require_with_a_wrong_password_fails(tls_router):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(tls_router.dsn(password="nope"), sslmode="require",
                        channel_binding="require", connect_timeout=CONNECT_TIMEOUT)


@pytest.mark.timeout(60)
async def test_asyncpg_connects_with_tls(strict_router, tls_files):
    conn = await asyncpg.connect(host="127.0.0.1", port=strict_router.port, user="alice",
                                 password="s3cret", database="job_alpha",
                                 ssl=_client_ssl(tls_files), timeout=10)
    try:
        assert conn._transport.get_extra_info("ssl_object") is not None
        assert await conn.fetchval("select $1::int + 1", 41) == 42
    finally:
        await conn.close()


@pytest.mark.timeout(60)
async def test_asyncpg_timeout_cancel_works_over_tls(strict_router, tls_files):
    conn = await asyncpg.connect(host="127.0.0.1", port=strict_router.port, user="alice",
                                 password="s3cret", database="job_alpha",
                                 ssl=_client_ssl(tls_files), timeout=10)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetch("select pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("select 1", timeout=15) == 1
        assert time.monotonic() - started < 10
    finally:
        await conn.close()


@pytest.mark.timeout(60)
def test_psycopg_cancel_works_over_tls(strict_router, pg):
    with _connect(strict_router, sslmode="require", autocommit=True) as conn:
        backend_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        out: dict[str, BaseException] = {}

        def run() -> None:
            try:
                conn.execute("select pg_sleep(30)")
            except BaseException as exc:
                out["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        dsn = (f"host=127.0.0.1 port={pg.port} user=postgres password={SUPERUSER_PASSWORD} "
               "dbname=job_alpha")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as mon:
            deadline = time.monotonic() + 20
            while not mon.execute("select 1 from pg_stat_activity where pid = %s and "
                                  "wait_event = 'PgSleep'", (backend_pid,)).fetchone():
                worker.join(timeout=0.02)
                assert worker.is_alive() and time.monotonic() < deadline, out
        started = time.monotonic()
        conn.cancel_safe(timeout=10)
        worker.join(timeout=20)
        assert not worker.is_alive(), "pg_sleep(30) was not cancelled"
        print(f"psycopg cancel over TLS: {(time.monotonic() - started) * 1000:.1f} ms")
        assert isinstance(out.get("error"), pgerrors.QueryCanceled), out
