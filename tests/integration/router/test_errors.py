"""Every SQLSTATE the router sends, checked on the wire.

psycopg 3 (3.3) leaves ``OperationalError.sqlstate`` as None for errors that
end a connection attempt (libpq reports them as text only), so these tests
speak the startup phase themselves: a startup packet, SCRAM via scramp, and
the ErrorResponse fields decoded (C: SQLSTATE, M: message, H: hint).
"""

from __future__ import annotations

import signal
import struct

import psycopg
import pytest
from scramp import ScramClient

from jobmesh.agent.postgres import free_port
from tests.support.postgres import SUPERUSER_PASSWORD
from tests.support.router import routes_toml
from tests.support.wire import (
    PROTOCOL_3_0,
    SSL_REQUEST,
    connect,
    error_fields,
    pmsg,
    read_error,
    read_message,
    startup_packet,
)


def login(port: int, user: str = "alice", password: str = "s3cret",
          database: str = "job_alpha") -> dict[str, str] | None:
    """Log in over plaintext; the ErrorResponse's fields, or None at ReadyForQuery."""
    with connect(port) as sock:
        sock.sendall(startup_packet({"user": user, "database": database}))
        scram: ScramClient | None = None
        while True:
            kind, body = read_message(sock)
            if kind == b"E":
                return error_fields(body)
            if kind == b"Z":
                return None
            if kind != b"R":
                continue
            (code,) = struct.unpack_from("!i", body)
            if code == 10:  # AuthenticationSASL
                scram = ScramClient(["SCRAM-SHA-256"], user, password)
                first = scram.get_client_first().encode()
                sock.sendall(pmsg(b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            elif code == 11:  # SASLContinue
                assert scram is not None
                scram.set_server_first(body[4:].decode())
                sock.sendall(pmsg(scram.get_client_final().encode()))
            elif code == 12:  # SASLFinal
                assert scram is not None
                scram.set_server_final(body[4:].decode())
            else:
                assert code == 0, f"unexpected authentication request {code}"


def send_raw(port: int, data: bytes) -> dict[str, str]:
    with connect(port) as sock:
        sock.sendall(data)
        return read_error(sock)


def assert_error(fields: dict[str, str] | None, sqlstate: str, hint_part: str) -> None:
    assert fields is not None, "the connection succeeded"
    assert fields.get("C") == sqlstate, fields
    assert fields.get("S") == "FATAL", fields
    assert hint_part in fields.get("H", ""), fields


def alpha(pg, **extra: object) -> dict[str, dict[str, object]]:
    return {"alpha": {"host": "127.0.0.1", "port": pg.port, "user": "postgres",
                      "password": SUPERUSER_PASSWORD, **extra}}


# --- 3D000 / 28P01 / 42501 ---------------------------------------------------------------


def test_dbname_not_of_job_form_is_3D000(router):
    assert_error(login(router.port, database="postgres"), "3D000", "dbname=job_<id>")


def test_unknown_job_id_is_3D000(router):
    fields = login(router.port, database="job_nope")
    assert_error(fields, "3D000", "job id")
    assert "nope" in fields["M"]


def test_wrong_password_is_28P01(router):
    assert_error(login(router.port, password="wrong"), "28P01", "password")


def test_unknown_user_is_28P01(router):
    assert_error(login(router.port, user="mallory", password="x"), "28P01", "password")


def test_authenticated_user_without_grant_is_42501(router):
    fields = login(router.port, user="bob", password="hunter2")
    assert_error(fields, "42501", "grant bob access to alpha")


def test_correct_login_reaches_ready_for_query(router):
    assert login(router.port) is None


# --- 53300 ------------------------------------------------------------------------------


def test_third_client_over_job_max_connections_is_53300(router_factory, pg):
    r = router_factory(routes_toml(pg, jobs=alpha(pg, max_connections=2)))
    with psycopg.connect(r.dsn(), connect_timeout=10), psycopg.connect(r.dsn(), connect_timeout=10):
        assert_error(login(r.port), "53300", "max_connections")


def test_failed_backend_logins_release_job_slots(router_factory):
    route = {"alpha": {"host": "127.0.0.1", "port": free_port(), "user": "postgres",
                       "max_connections": 1}}
    r = router_factory(routes_toml(None, jobs=route))
    for _ in range(3):
        assert_error(login(r.port), "57P03", "try again")


def test_client_over_max_client_conn_is_53300(router_factory, pg):
    r = router_factory(routes_toml(pg), "--max-client-conn", "1")
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        assert_error(login(r.port), "53300", "--max-client-conn")
        assert conn.execute("select 1").fetchone() == (1,)


# --- 57P03 ------------------------------------------------------------------------------


def test_unreachable_backend_is_57P03(router_factory):
    route = {"alpha": {"host": "127.0.0.1", "port": free_port(), "user": "postgres",
                       "password": SUPERUSER_PASSWORD}}
    r = router_factory(routes_toml(None, jobs=route))
    fields = login(r.port)
    assert_error(fields, "57P03", "not accepting connections")
    assert "alpha" in fields["M"]


def test_backend_refusing_router_credentials_is_57P03(router_factory, pg):
    r = router_factory(routes_toml(pg, jobs=alpha(pg, password="not-the-password")))
    fields = login(r.port)
    assert_error(fields, "57P03", "not accepting connections")
    assert "not-the-password" not in str(fields)
    r.wait_for_log(r"job alpha: backend login failed")


# --- 57P01 ------------------------------------------------------------------------------


def test_session_outliving_shutdown_timeout_gets_57P01(router_factory, pg):
    r = router_factory(routes_toml(pg), "--shutdown-timeout", "1")
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        r.signal(signal.SIGTERM)
        r.wait_for_log(r"shutdown timeout: terminating 1 sessions")
        assert r.proc.wait(timeout=30) == 0
        with pytest.raises(psycopg.OperationalError) as exc_info:
            conn.execute("select 1")
    assert exc_info.value.sqlstate == "57P01"


def test_session_finishing_before_shutdown_timeout_is_not_disturbed(router_factory, pg):
    r = router_factory(routes_toml(pg), "--shutdown-timeout", "60")
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        r.signal(signal.SIGTERM)
        r.wait_for_log(r"shutting down: waiting up to 60s for 1 sessions")
        for i in range(5):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    r.wait_for_log(r"router stopped")
    assert not any("terminating" in line for line in r.seen)
    assert r.proc.wait(timeout=30) == 0


def test_client_in_handshake_at_shutdown_gets_57P01_from_router(router):
    with connect(router.port) as sock:
        sock.sendall(startup_packet({"user": "alice", "database": "job_alpha"}))
        kind, body = read_message(sock)
        assert (kind, body[:4]) == (b"R", struct.pack("!i", 10))  # mid-SCRAM now
        router.signal(signal.SIGTERM)
        fields = read_error(sock)
    assert_error(fields, "57P01", "Reconnect")
    assert router.proc.wait(timeout=30) == 0


# --- 08P01 ------------------------------------------------------------------------------

MALFORMED = {
    "length_3": struct.pack("!i", 3),
    "unterminated_parameters": (
        lambda body: struct.pack("!i", len(body) + 4) + body
    )(struct.pack("!i", PROTOCOL_3_0) + b"user\0alice\0database\0job_alpha"),
    "length_over_10000": struct.pack("!ii", 20_000, PROTOCOL_3_0),
    "protocol_2_0": startup_packet({"user": "alice"}, version=2 << 16),
}


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_startup_packet_is_08P01(router, packet):
    assert_error(send_raw(router.port, packet), "08P01", "invalid bytes")


# --- TLS: 28000, and plaintext smuggled after SSLRequest ----------------------------------


@pytest.fixture
def tls_router(router_factory, pg, tls_files):
    return router_factory(routes_toml(pg), "--require-tls", "--tls-cert", str(tls_files["cert"]),
                          "--tls-key", str(tls_files["key"]))


def test_plaintext_client_with_require_tls_is_28000(tls_router):
    assert_error(login(tls_router.port), "28000", "sslmode=require")


def test_tls_client_with_require_tls_is_served(tls_router, tls_files):
    dsn = tls_router.dsn(sslmode="verify-full", sslrootcert=str(tls_files["ca"]),
                         channel_binding="require")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("select current_database()").fetchone() == ("job_alpha",)
        assert conn.pgconn.ssl_in_use


def test_plaintext_pipelined_after_ssl_request_is_08P01(tls_router):
    packet = SSL_REQUEST + startup_packet({"user": "alice", "database": "job_alpha"})
    assert_error(send_raw(tls_router.port, packet), "08P01", "invalid bytes")


# --- backends: every auth method, and their own errors relayed -----------------------------


@pytest.mark.parametrize("method", ["trust", "md5", "scram-sha-256"])
def test_backend_auth_method_works_through_router(router_factory, pg_factory, method):
    backend = pg_factory(f"auth-{method}", auth_host=method)
    spec = {"host": "127.0.0.1", "port": backend.port, "user": "postgres"}
    if method != "trust":
        spec["password"] = SUPERUSER_PASSWORD
    r = router_factory(routes_toml(backend, jobs={"alpha": spec}))
    with psycopg.connect(r.dsn(), connect_timeout=10) as conn:
        rules = conn.execute(
            "select distinct auth_method from pg_hba_file_rules where type = 'host'"
        ).fetchall()
        assert rules == [(method,)]
        assert conn.execute("select current_database()").fetchone() == ("job_alpha",)


def test_backend_error_response_is_relayed(router_factory, pg):
    r = router_factory(routes_toml(pg, jobs=alpha(pg, database="no_such_db")))
    fields = login(r.port)
    assert fields is not None
    assert fields["C"] == "3D000"
    assert fields["M"] == 'database "no_such_db" does not exist'  # Postgres's text, not ours


def test_a_job_id_with_capitals_says_ids_are_lowercase(router_factory, pg):
    r = router_factory(routes_toml(pg))
    fields = login(r.port, database="job_Scrape-42")
    assert fields is not None and fields["C"] == "3D000"
    assert fields["M"] == 'database "job_Scrape-42" does not exist: ids are lowercase'
    assert "job ids are 1-59 characters" in fields["H"]
