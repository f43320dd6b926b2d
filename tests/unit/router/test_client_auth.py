"""Authentication both ways, against scramp's independent SCRAM code as the peer."""

from __future__ import annotations

import base64
import hashlib
import ssl

import pytest
import trustme
from scramp import ScramClient, ScramMechanism

from jobmesh.router import backend_handshake as bh
from jobmesh.router import protocol as pg
from jobmesh.router.client_auth import CleartextExchange, ScramExchange, Step
from jobmesh.router.credentials import (
    InvalidVerifier,
    MockVerifiers,
    credential_from_config,
    make_verifier,
    parse_verifier,
)

PASSWORD = "s3cret"
VERIFIER = make_verifier(PASSWORD)
FAILED = Step(b"", done=True, ok=False)


def parse(data: bytes) -> pg.Message:
    frames = pg.FrameBuffer()
    frames.feed(data)
    msg = frames.next_message(pg.MAX_BACKEND_STARTUP_MESSAGE)
    assert msg is not None and len(frames) == 0
    return msg


def sasl_payload(reply: bytes, expected_code: int) -> str:
    code, data = pg.decode_authentication(parse(reply).body)
    assert code == expected_code
    return data.decode()


def initial_response(mechanism: str, client_first: str) -> bytes:
    return parse(pg.sasl_initial_response(mechanism, client_first.encode())).body


def scram(exchange: ScramExchange, client: ScramClient, mechanism: str = "SCRAM-SHA-256",
          client_first: str | None = None) -> Step:
    """Run one exchange to its end; the client checks the router's signature on success."""
    first = exchange.step(initial_response(mechanism, client_first or client.get_client_first()))
    assert not first.done, "the router must answer client-first with a challenge"
    client.set_server_first(sasl_payload(first.reply, pg.AUTH_SASL_CONTINUE))
    final = exchange.step(client.get_client_final().encode())
    assert final.done
    if final.ok:
        client.set_server_final(sasl_payload(final.reply, pg.AUTH_SASL_FINAL))
    return final


def empty_username_first(client: ScramClient) -> str:
    """libpq's client-first: an empty ``n=``, the role being the startup packet's."""
    first = client.get_client_first().replace(",n=placeholder,", ",n=,", 1)
    client.client_first_bare = first.split(",", 2)[2]  # what the client's proof signs
    return first


@pytest.fixture(scope="module")
def cert_pem() -> str:
    return trustme.CA().issue_cert("localhost").cert_chain_pems[0].bytes().decode()


def end_point(pem: str) -> tuple[str, bytes]:
    return "tls-server-end-point", hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest()


# --- ScramExchange ----------------------------------------------------------------


def test_scram_without_tls_offers_only_scram_sha_256():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    assert exchange.start() == pg.auth_sasl(["SCRAM-SHA-256"])


def test_scram_with_a_certificate_offers_plus_first(cert_pem):
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=cert_pem)
    assert exchange.mechanisms() == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_scram_with_right_password_succeeds_and_the_router_proves_its_key():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    assert scram(exchange, ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)).ok


def test_scram_with_libpq_empty_username_succeeds():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    client = ScramClient(["SCRAM-SHA-256"], "placeholder", PASSWORD)
    assert scram(exchange, client, client_first=empty_username_first(client)).ok


def test_scram_with_wrong_password_fails_without_a_reply():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    assert scram(exchange, ScramClient(["SCRAM-SHA-256"], "alice", "wrong")) == FAILED


def test_scram_with_empty_username_and_wrong_password_fails():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    client = ScramClient(["SCRAM-SHA-256"], "placeholder", "wrong")
    assert not scram(exchange, client, client_first=empty_username_first(client)).ok


def test_scram_for_unknown_user_fails_at_the_proof_even_with_a_matching_password():
    exchange = ScramExchange(VERIFIER, exists=False, cert_pem=None)
    assert not scram(exchange, ScramClient(["SCRAM-SHA-256"], "mallory", PASSWORD)).ok


def test_unknown_user_sees_the_same_salt_on_every_attempt():
    mocks = MockVerifiers()
    salts = []
    for _ in range(2):
        exchange = ScramExchange(mocks.for_user("mallory"), exists=False, cert_pem=None)
        client = ScramClient(["SCRAM-SHA-256"], "mallory", PASSWORD)
        reply = exchange.step(initial_response("SCRAM-SHA-256", client.get_client_first())).reply
        salts.append(sasl_payload(reply, pg.AUTH_SASL_CONTINUE).split(",")[1])  # s=<salt>
    assert salts[0] == salts[1]
    assert mocks.for_user("mallory").salt != mocks.for_user("eve").salt


def test_scram_plus_with_the_servers_certificate_hash_succeeds(cert_pem):
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=cert_pem)
    client = ScramClient(["SCRAM-SHA-256-PLUS"], "alice", PASSWORD,
                         channel_binding=end_point(cert_pem))
    assert scram(exchange, client, "SCRAM-SHA-256-PLUS").ok


def test_scram_plus_with_empty_username_succeeds(cert_pem):
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=cert_pem)
    client = ScramClient(["SCRAM-SHA-256-PLUS"], "placeholder", PASSWORD,
                         channel_binding=end_point(cert_pem))
    first = empty_username_first(client)
    assert first.startswith("p=tls-server-end-point,,n=,r=")
    assert scram(exchange, client, "SCRAM-SHA-256-PLUS", client_first=first).ok


def test_scram_plus_bound_to_another_certificate_fails(cert_pem):
    other = trustme.CA().issue_cert("localhost").cert_chain_pems[0].bytes().decode()
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=cert_pem)
    client = ScramClient(["SCRAM-SHA-256-PLUS"], "alice", PASSWORD,
                         channel_binding=end_point(other))
    assert not scram(exchange, client, "SCRAM-SHA-256-PLUS").ok


def test_scram_plus_without_tls_is_a_violation():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    with pytest.raises(pg.ProtocolViolation, match="invalid SASL mechanism"):
        exchange.step(initial_response("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,,n=,r=x"))


def test_scram_over_tls_rejects_a_client_that_claims_the_server_cannot_bind(cert_pem):
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=cert_pem)
    client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD, channel_binding=end_point(cert_pem))
    first = client.get_client_first()
    assert first.startswith("y,,")
    try:
        step = exchange.step(initial_response("SCRAM-SHA-256", first))
        if not step.done:
            client.set_server_first(sasl_payload(step.reply, pg.AUTH_SASL_CONTINUE))
            step = exchange.step(client.get_client_final().encode())
    except pg.ProtocolViolation:
        return  # refusing the exchange outright is as good as failing it
    assert step.done and not step.ok


def test_scram_client_first_that_scramp_rejects_fails_the_exchange():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    assert exchange.step(initial_response("SCRAM-SHA-256", "n,,garbage")) == FAILED


def test_scram_client_first_without_a_gs2_header_is_a_violation():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    with pytest.raises(pg.ProtocolViolation, match="client-first"):
        exchange.step(initial_response("SCRAM-SHA-256", "n=alice"))


def test_scram_message_that_is_not_utf8_is_a_violation():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    with pytest.raises(pg.ProtocolViolation, match="UTF-8"):
        exchange.step(b"SCRAM-SHA-256\0\0\0\0\x02\xff\xfe")


def test_scram_message_after_the_exchange_ended_is_a_violation():
    exchange = ScramExchange(VERIFIER, exists=True, cert_pem=None)
    scram(exchange, ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD))
    with pytest.raises(pg.ProtocolViolation, match="after the exchange ended"):
        exchange.step(b"c=biws")


# --- CleartextExchange ----------------------------------------------------------------


def test_cleartext_starts_with_authentication_cleartext_password():
    assert CleartextExchange(VERIFIER, exists=True).start() == pg.auth_cleartext()


def test_cleartext_with_right_password_succeeds():
    assert CleartextExchange(VERIFIER, exists=True).step(b"s3cret\0") == Step(b"", True, True)


def test_cleartext_with_wrong_password_fails():
    assert CleartextExchange(VERIFIER, exists=True).step(b"s3cre\0") == FAILED


def test_cleartext_for_unknown_user_fails_even_with_a_matching_password():
    assert not CleartextExchange(VERIFIER, exists=False).step(b"s3cret\0").ok


def test_cleartext_password_with_control_characters_fails_instead_of_raising():
    assert CleartextExchange(VERIFIER, exists=True).step(b"a\x07b\0") == FAILED


# --- credentials --------------------------------------------------------------------


# Postgres's own regression suite (src/test/regress/sql/password.sql) stores this
# verifier, which Postgres generated for the empty password.
POSTGRES_EMPTY_PASSWORD = (
    "SCRAM-SHA-256$4096:hpFyHTUsSWcR7O9P$LgZFIt6Oqdo27ZFKbZ2nV+vtnYM995pDh9ca6WSi120="
    ":qVV5NeluNfUPkwm7Vqat25RjSPLkGeoZBQs6wVv+um4="
)


def test_parse_verifier_reads_a_verifier_postgres_generated():
    verifier = parse_verifier(POSTGRES_EMPTY_PASSWORD)
    assert verifier.iterations == 4096
    assert verifier.salt == base64.b64decode("hpFyHTUsSWcR7O9P")
    assert verifier.matches("")
    assert not verifier.matches("x")


def test_verifier_text_round_trips_through_str():
    assert str(VERIFIER).startswith("SCRAM-SHA-256$4096:")
    assert parse_verifier(str(VERIFIER)) == VERIFIER
    assert parse_verifier(str(VERIFIER)).matches(PASSWORD)


def test_credential_from_config_keeps_a_verifier_and_hashes_plain_text():
    assert credential_from_config(str(VERIFIER)) == VERIFIER
    made = credential_from_config(PASSWORD)
    assert made.matches(PASSWORD) and made.salt != VERIFIER.salt


GOOD = str(VERIFIER)
_, _PARAMS, _KEYS = GOOD.split("$")
_SALT = _PARAMS.split(":")[1]
_SHORT_KEY = base64.b64encode(b"k" * 31).decode()
MALFORMED = {
    "empty": "",
    "truncated": "SCRAM-SHA-256$4096",
    "extra-part": GOOD + "$extra",
    "other-scheme": GOOD.replace("SCRAM-SHA-256", "SCRAM-SHA-512"),
    "iterations-not-int": f"SCRAM-SHA-256$many:{_SALT}${_KEYS}",
    "too-few-iterations": f"SCRAM-SHA-256$4095:{_SALT}${_KEYS}",
    "bad-base64": f"SCRAM-SHA-256$4096:not*base64${_KEYS}",
    "empty-salt": f"SCRAM-SHA-256$4096:${_KEYS}",
    "short-stored-key": f"SCRAM-SHA-256${_PARAMS}${_SHORT_KEY}:{_KEYS.split(':')[1]}",
    "one-key": f"SCRAM-SHA-256${_PARAMS}${_KEYS.split(':')[0]}",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_verifier_is_invalid(text):
    with pytest.raises(InvalidVerifier):
        parse_verifier(text)


def test_verifier_with_more_iterations_than_scramp_computes_is_invalid():
    with pytest.raises(InvalidVerifier):
        parse_verifier(GOOD.replace("$4096:", "$10000001:", 1))


# --- bh.BackendHandshake ----------------------------------------------------------------


def backend(password: str | None = "pw", **options: str) -> bh.BackendHandshake:
    return bh.BackendHandshake("postgres", "job_alpha", password, options)


def events(hs: bh.BackendHandshake, data: bytes) -> list[object]:
    hs.receive_data(data)
    out = []
    while (event := hs.next_event()) is not None:
        out.append(event)
        if isinstance(event, bh.Ready | bh.BackendError):
            break
    return out


KEY = b"\0\0\0M"
STARTUP_TAIL = (pg.parameter_status("server_version", "15.4") + pg.backend_key_data(4242, KEY)
                + pg.ready_for_query(b"I"))
STARTUP_EVENTS = [bh.Relay(pg.parameter_status("server_version", "15.4")), bh.KeyData(4242, KEY),
                  bh.Ready(b"I", b"")]


def test_backend_startup_packet_names_user_database_and_options():
    frames = pg.FrameBuffer()
    frames.feed(backend(application_name="psql").startup_bytes())
    assert pg.decode_first_packet(frames.next_startup_packet()) == pg.StartupMessage(
        3, 0, {"user": "postgres", "database": "job_alpha", "application_name": "psql"}
    )


def test_backend_trust_login_relays_parameters_keeps_key_and_ends_ready():
    assert events(backend(), pg.auth_ok() + STARTUP_TAIL) == STARTUP_EVENTS


def test_backend_bytes_after_ready_for_query_are_returned_as_leftover():
    out = events(backend(), pg.auth_ok() + pg.ready_for_query(b"T") + b"Nsplice-me")
    assert out == [bh.Ready(b"T", b"Nsplice-me")]


def test_backend_notice_and_protocol_negotiation_during_auth_are_handled():
    notice = pg.notice_response("hi")
    data = pg.negotiate_protocol_version(0, ["_pq_.x"]) + notice + pg.auth_ok() + STARTUP_TAIL
    assert events(backend(), data) == [bh.Relay(notice), *STARTUP_EVENTS]


def test_backend_cleartext_request_is_answered_with_the_route_password():
    assert events(backend("pw"), pg.auth_cleartext()) == [bh.Send(b"p\x00\x00\x00\x07pw\x00")]


def test_backend_password_request_without_a_route_password_fails():
    with pytest.raises(bh.BackendAuthFailed, match="route has none"):
        events(backend(None), pg.auth_cleartext())


def test_backend_md5_request_is_answered_with_salted_double_md5():
    # md5(md5("pw" + "postgres").hex + salt), as libpq computes it.
    out = events(backend("pw"), pg.authentication(pg.AUTH_MD5, b"\x01\x02\x03\x04"))
    assert out == [bh.Send(pg.password_message(b"md549ecef387f96d9f1f78c977dc4c331ae\0"))]


def scram_backend() -> tuple[bh.BackendHandshake, object]:
    """A handshake that answered the backend's SASL request, and scramp's server for it."""
    mech = ScramMechanism()
    auth_info = mech.make_auth_info("pw")
    server = mech.make_server(lambda _user: auth_info)
    hs = backend("pw")
    [first] = events(hs, pg.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    mechanism, client_first = pg.decode_sasl_initial_response(parse(first.data).body)
    assert mechanism == "SCRAM-SHA-256"
    server.set_client_first(client_first.decode())
    return hs, server


def test_backend_scram_login_against_scramp_server():
    hs, server = scram_backend()
    [final] = events(hs, pg.auth_sasl_continue(server.get_server_first().encode()))
    server.set_client_final(parse(final.data).body.decode())  # raises if the proof is wrong
    server_final = pg.auth_sasl_final(server.get_server_final().encode())
    assert events(hs, server_final + pg.auth_ok() + STARTUP_TAIL) == STARTUP_EVENTS


def test_backend_scram_with_a_forged_server_signature_fails():
    hs, server = scram_backend()
    events(hs, pg.auth_sasl_continue(server.get_server_first().encode()))
    forged = "v=" + base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(bh.BackendAuthFailed, match="signature"):
        events(hs, pg.auth_sasl_final(forged.encode()))


def test_backend_scram_with_a_malformed_challenge_fails():
    hs, _ = scram_backend()
    with pytest.raises(bh.BackendAuthFailed, match="SCRAM with the backend failed"):
        events(hs, pg.auth_sasl_continue(b"garbage"))


def test_backend_scram_challenge_that_is_not_utf8_fails_the_login():
    hs, _ = scram_backend()
    with pytest.raises((bh.BackendAuthFailed, pg.ProtocolViolation)):
        events(hs, pg.auth_sasl_continue(b"\xff"))


def test_backend_scram_with_a_route_password_saslprep_rejects_answers_or_fails_cleanly():
    # libpq would send the raw password bytes; a clean BackendAuthFailed is acceptable too.
    try:
        [answer] = events(backend("pw\x07"), pg.auth_sasl(["SCRAM-SHA-256"]))
    except bh.BackendAuthFailed:
        return
    assert isinstance(answer, bh.Send)


def test_backend_offering_only_scram_plus_fails():
    with pytest.raises(bh.BackendAuthFailed, match="no usable SASL mechanism"):
        events(backend(), pg.auth_sasl(["SCRAM-SHA-256-PLUS"]))


def test_backend_asking_for_an_unsupported_method_fails():
    with pytest.raises(bh.BackendAuthFailed, match="unsupported authentication method 7"):
        events(backend(), pg.authentication(7))


def test_backend_rejecting_the_routers_password_raises_backend_auth_failed():
    error = pg.error_response("28P01", 'password authentication failed for user "postgres"')
    with pytest.raises(bh.BackendAuthFailed, match="password authentication failed"):
        events(backend(), error)


def test_backend_error_outside_class_28_is_passed_on_verbatim():
    error = pg.error_response("3D000", 'database "job_alpha" does not exist')
    [event] = events(backend(), pg.auth_ok() + error)
    assert event == bh.BackendError(pg.decode_fields(parse(error).body), error)
    assert event.fields["C"] == "3D000"


def test_backend_query_traffic_before_ready_for_query_is_a_violation():
    with pytest.raises(pg.ProtocolViolation, match="before ReadyForQuery"):
        events(backend(), pg.auth_ok() + pg.message(b"D", b"\0\0"))


def test_backend_handshake_refuses_input_once_ready():
    hs = backend()
    events(hs, pg.auth_ok() + pg.ready_for_query())
    with pytest.raises(RuntimeError, match="ready"):
        hs.next_event()
