"""The client-facing handshake state machine, driven with plain bytes."""

from __future__ import annotations

import struct

import pytest

from jobmesh.router import protocol as pg
from jobmesh.router.handshake import AuthResponse, ClientHandshake, State, Terminated

STARTUP = pg.startup_message({"user": "alice", "database": "job_alpha"})
GSSENC_REQUEST = struct.pack("!ii", 8, pg.GSSENC_REQUEST_CODE)


def drain(hs: ClientHandshake) -> list[object]:
    """Every event the bytes received so far complete."""
    events = []
    while (event := hs.next_event()) is not None:
        events.append(event)
        if hs.state is State.CLOSED:
            break
    return events


def feed(data: bytes, hs: ClientHandshake | None = None) -> list[object]:
    hs = hs or ClientHandshake()
    hs.receive_data(data)
    return drain(hs)


def startup_event(params: dict[str, str]) -> pg.StartupMessage:
    return pg.StartupMessage(3, 0, params)


# --- framing is independent of how bytes are split ----------------------------

CONVERSATION = (
    pg.ssl_request()
    + STARTUP
    + pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    + pg.password_message(b"c=biws,r=abcdef,p=xyz")
    + pg.terminate()
)
CONVERSATION_EVENTS = [
    pg.SSLRequest(),
    startup_event({"user": "alice", "database": "job_alpha"}),
    AuthResponse(b"SCRAM-SHA-256\0" + struct.pack("!i", 11) + b"n,,n=,r=abc"),
    AuthResponse(b"c=biws,r=abcdef,p=xyz"),
    Terminated(),
]


def test_whole_conversation_in_one_chunk_yields_every_event():
    assert feed(CONVERSATION) == CONVERSATION_EVENTS


def test_conversation_fed_one_byte_at_a_time_yields_the_same_events():
    hs = ClientHandshake()
    events = []
    for i in range(len(CONVERSATION)):
        hs.receive_data(CONVERSATION[i : i + 1])
        events += drain(hs)
    assert events == CONVERSATION_EVENTS


@pytest.mark.parametrize("cut", range(1, len(CONVERSATION)))
def test_conversation_split_at_any_boundary_yields_the_same_events(cut):
    hs = ClientHandshake()
    hs.receive_data(CONVERSATION[:cut])
    events = drain(hs)
    hs.receive_data(CONVERSATION[cut:])
    assert events + drain(hs) == CONVERSATION_EVENTS


def test_no_event_until_a_packet_is_complete():
    hs = ClientHandshake()
    hs.receive_data(STARTUP[:-1])
    assert hs.next_event() is None
    assert hs.state is State.FIRST_PACKET


# --- the first packet ------------------------------------------------------------


def test_startup_message_moves_to_authenticating():
    hs = ClientHandshake()
    assert feed(STARTUP, hs) == [startup_event({"user": "alice", "database": "job_alpha"})]
    assert hs.state is State.AUTHENTICATING


def test_ssl_request_then_startup_message_is_accepted():
    hs = ClientHandshake()
    assert feed(pg.ssl_request(), hs) == [pg.SSLRequest()]
    assert hs.state is State.FIRST_PACKET
    assert feed(STARTUP, hs) == [startup_event({"user": "alice", "database": "job_alpha"})]


def test_duplicate_ssl_request_is_a_violation():
    hs = ClientHandshake()
    feed(pg.ssl_request(), hs)
    hs.receive_data(pg.ssl_request())
    with pytest.raises(pg.ProtocolViolation, match="duplicate SSLRequest"):
        hs.next_event()


def test_gssenc_request_then_ssl_request_is_allowed():
    hs = ClientHandshake()
    assert feed(GSSENC_REQUEST + pg.ssl_request() + STARTUP, hs) == [
        pg.GSSENCRequest(),
        pg.SSLRequest(),
        startup_event({"user": "alice", "database": "job_alpha"}),
    ]


def test_gssenc_request_after_ssl_request_is_a_violation():
    hs = ClientHandshake()
    feed(pg.ssl_request(), hs)
    hs.receive_data(GSSENC_REQUEST)
    with pytest.raises(pg.ProtocolViolation, match="GSSENCRequest"):
        hs.next_event()


def test_duplicate_gssenc_request_is_a_violation():
    hs = ClientHandshake()
    feed(GSSENC_REQUEST, hs)
    hs.receive_data(GSSENC_REQUEST)
    with pytest.raises(pg.ProtocolViolation, match="GSSENCRequest"):
        hs.next_event()


def test_nothing_is_buffered_after_a_lone_ssl_request():
    hs = ClientHandshake()
    feed(pg.ssl_request(), hs)
    assert not hs.has_buffered_data()


def test_bytes_pipelined_after_ssl_request_are_reported_as_buffered():
    # CVE-2021-23214: plaintext sent before the TLS handshake must not be trusted.
    hs = ClientHandshake()
    hs.receive_data(pg.ssl_request() + STARTUP[:3])
    assert hs.next_event() == pg.SSLRequest()
    assert hs.has_buffered_data()


def test_cancel_request_yields_the_key_and_closes():
    hs = ClientHandshake()
    assert feed(pg.cancel_request(7, b"\0\0\0c"), hs) == [pg.CancelRequest(7, b"\0\0\0c")]
    assert hs.state is State.CLOSED


def test_any_input_after_a_cancel_request_is_a_violation():
    hs = ClientHandshake()
    feed(pg.cancel_request(7, b"\0\0\0c"), hs)
    hs.receive_data(STARTUP)
    with pytest.raises(pg.ProtocolViolation, match="closed"):
        hs.next_event()


def test_malformed_first_packet_is_a_violation():
    hs = ClientHandshake()
    hs.receive_data(struct.pack("!ii", 8, 2 << 16))
    with pytest.raises(pg.ProtocolViolation, match=r"unsupported frontend protocol 2\.0"):
        hs.next_event()


def test_oversized_first_packet_is_a_violation_before_it_arrives():
    hs = ClientHandshake()
    hs.receive_data(struct.pack("!i", pg.MAX_STARTUP_PACKET + 1))
    with pytest.raises(pg.ProtocolViolation, match="invalid startup packet length"):
        hs.next_event()


# --- authenticating ---------------------------------------------------------------


def authenticating() -> ClientHandshake:
    hs = ClientHandshake()
    feed(STARTUP, hs)
    assert hs.state is State.AUTHENTICATING
    return hs


def test_password_message_becomes_an_auth_response_with_its_body():
    hs = authenticating()
    assert feed(pg.password_message(b"s3cret\0"), hs) == [AuthResponse(b"s3cret\0")]
    assert hs.state is State.AUTHENTICATING


def test_terminate_becomes_terminated_and_closes():
    hs = authenticating()
    assert feed(pg.terminate(), hs) == [Terminated()]
    assert hs.state is State.CLOSED


@pytest.mark.parametrize("kind", [b"Q", b"P", b"S", b"\0", b"x"])
def test_any_other_message_type_while_authenticating_is_a_violation(kind):
    hs = authenticating()
    hs.receive_data(pg.message(kind, b"select 1\0"))
    with pytest.raises(pg.ProtocolViolation, match="expected a password response"):
        hs.next_event()


def test_auth_response_larger_than_the_auth_cap_is_a_violation():
    hs = authenticating()
    hs.receive_data(b"p" + struct.pack("!I", pg.MAX_AUTH_MESSAGE + 1))
    with pytest.raises(pg.ProtocolViolation, match="invalid length"):
        hs.next_event()


def test_authenticated_returns_pipelined_bytes_and_moves_to_ready():
    hs = authenticating()
    pipelined = pg.message(b"Q", b"select 1\0") + b"Q\0\0"
    hs.receive_data(pg.password_message(b"s3cret\0") + pipelined)
    assert hs.next_event() == AuthResponse(b"s3cret\0")
    assert hs.authenticated() == pipelined
    assert hs.state is State.READY
    assert not hs.has_buffered_data()


def test_authenticated_with_nothing_pipelined_returns_no_bytes():
    hs = authenticating()
    assert hs.authenticated() == b""


def test_authenticated_before_a_startup_message_is_an_error():
    with pytest.raises(RuntimeError, match="first_packet"):
        ClientHandshake().authenticated()


def test_no_handshake_input_is_expected_once_ready():
    hs = authenticating()
    hs.authenticated()
    with pytest.raises(pg.ProtocolViolation, match="ready"):
        hs.next_event()
