"""The sans-IO wire codec: framing, the client's first packet, and the encoders."""

from __future__ import annotations

import struct

import pytest

from jobmesh.router import protocol as pg


def packet(code: int, rest: bytes = b"") -> bytes:
    """An untyped packet: Int32 length (including itself), Int32 code, then ``rest``."""
    return struct.pack("!ii", 8 + len(rest), code) + rest


def payload(code: int, rest: bytes = b"") -> bytes:
    """What FrameBuffer hands to decode_first_packet: the packet minus its length."""
    return struct.pack("!i", code) + rest


def parse(data: bytes) -> pg.Message:
    """Exactly one typed message, as a FrameBuffer cuts it."""
    frames = pg.FrameBuffer()
    frames.feed(data)
    msg = frames.next_message(pg.MAX_BACKEND_STARTUP_MESSAGE)
    assert msg is not None
    assert len(frames) == 0, "encoder produced trailing bytes"
    return msg


# --- FrameBuffer: startup packets ----------------------------------------------


def test_startup_packet_is_none_until_the_length_word_is_complete():
    frames = pg.FrameBuffer()
    frames.feed(b"\x00\x00\x00")
    assert frames.next_startup_packet() is None
    assert len(frames) == 3


def test_startup_packet_is_none_until_the_whole_packet_arrived():
    data = pg.ssl_request()
    frames = pg.FrameBuffer()
    frames.feed(data[:-1])
    assert frames.next_startup_packet() is None
    frames.feed(data[-1:])
    assert frames.next_startup_packet() == payload(pg.SSL_REQUEST_CODE)


def test_startup_packet_leaves_following_bytes_buffered():
    frames = pg.FrameBuffer()
    frames.feed(pg.ssl_request() + b"extra")
    assert frames.next_startup_packet() == payload(pg.SSL_REQUEST_CODE)
    assert len(frames) == 5
    assert frames.take_all() == b"extra"
    assert len(frames) == 0


@pytest.mark.parametrize("length", [-1, 0, 4, 7])
def test_startup_packet_shorter_than_eight_bytes_is_a_violation(length):
    frames = pg.FrameBuffer()
    frames.feed(struct.pack("!i", length) + b"\0" * 8)
    with pytest.raises(pg.ProtocolViolation, match="invalid startup packet length"):
        frames.next_startup_packet()


def test_startup_packet_of_exactly_the_maximum_length_is_accepted():
    frames = pg.FrameBuffer()
    frames.feed(struct.pack("!i", pg.MAX_STARTUP_PACKET) + b"\0" * (pg.MAX_STARTUP_PACKET - 4))
    assert len(frames.next_startup_packet()) == pg.MAX_STARTUP_PACKET - 4


def test_startup_packet_longer_than_the_maximum_is_refused_from_its_length_alone():
    frames = pg.FrameBuffer()
    frames.feed(struct.pack("!i", pg.MAX_STARTUP_PACKET + 1))
    with pytest.raises(pg.ProtocolViolation, match="10001"):
        frames.next_startup_packet()


# --- FrameBuffer: typed messages -------------------------------------------------


def test_typed_message_is_cut_after_its_announced_length():
    frames = pg.FrameBuffer()
    frames.feed(pg.message(b"p", b"abc") + b"X")
    assert frames.next_message(100) == pg.Message(b"p", b"abc")
    assert frames.take_all() == b"X"


def test_typed_message_is_none_until_complete():
    data = pg.message(b"p", b"abc")
    frames = pg.FrameBuffer()
    for i in range(len(data) - 1):
        frames.feed(data[i : i + 1])
        assert frames.next_message(100) is None
    frames.feed(data[-1:])
    assert frames.next_message(100) == pg.Message(b"p", b"abc")


def test_typed_message_with_length_below_four_is_a_violation():
    frames = pg.FrameBuffer()
    frames.feed(b"p" + struct.pack("!I", 3))
    with pytest.raises(pg.ProtocolViolation, match="invalid length 3"):
        frames.next_message(100)


def test_typed_message_longer_than_the_cap_is_refused_from_its_header_alone():
    frames = pg.FrameBuffer()
    frames.feed(b"p" + struct.pack("!I", 101))
    with pytest.raises(pg.ProtocolViolation, match="invalid length 101"):
        frames.next_message(100)


# --- decode_first_packet ---------------------------------------------------------


def test_decodes_ssl_request():
    assert pg.decode_first_packet(payload(pg.SSL_REQUEST_CODE)) == pg.SSLRequest()


def test_decodes_gssenc_request():
    assert pg.decode_first_packet(payload(pg.GSSENC_REQUEST_CODE)) == pg.GSSENCRequest()


@pytest.mark.parametrize("code", [pg.SSL_REQUEST_CODE, pg.GSSENC_REQUEST_CODE])
def test_encryption_request_with_a_body_is_a_violation(code):
    with pytest.raises(pg.ProtocolViolation, match="expected 4"):
        pg.decode_first_packet(payload(code, b"\0"))


def test_decodes_cancel_request_with_unsigned_pid_and_secret():
    body = struct.pack("!II", 0xFFFFFFF0, 0xFFFFFFFF)
    assert pg.decode_first_packet(payload(pg.CANCEL_REQUEST_CODE, body)) == pg.CancelRequest(
        0xFFFFFFF0, b"\xff" * 4
    )


@pytest.mark.parametrize("length", [4, 32, 256])
def test_a_protocol_3_2_cancel_request_carries_a_key_of_4_to_256_bytes(length):
    body = struct.pack("!I", 7) + bytes(range(length % 256)) + b"\1" * (length - length % 256)
    assert pg.decode_first_packet(payload(pg.CANCEL_REQUEST_CODE, body)) == pg.CancelRequest(
        7, body[4:]
    )


@pytest.mark.parametrize("rest", [b"", b"\0" * 7, b"\0" * 261])
def test_cancel_request_of_the_wrong_size_is_a_violation(rest):
    with pytest.raises(pg.ProtocolViolation, match="CancelRequest"):
        pg.decode_first_packet(payload(pg.CANCEL_REQUEST_CODE, rest))


def test_decodes_startup_message_parameters():
    rest = b"user\0alice\0database\0job_alpha\0application_name\0\0\0"
    assert pg.decode_first_packet(payload(pg.PROTOCOL_3_0, rest)) == pg.StartupMessage(
        3, 0, {"user": "alice", "database": "job_alpha", "application_name": ""}
    )


def test_decodes_startup_message_without_parameters():
    assert pg.decode_first_packet(payload(pg.PROTOCOL_3_0, b"\0")) == pg.StartupMessage(3, 0, {})


@pytest.mark.parametrize("minor", [1, 2, 0xFFFF])
def test_startup_message_keeps_a_3x_minor_version(minor):
    packet_ = pg.decode_first_packet(payload((3 << 16) | minor, b"user\0u\0\0"))
    assert (packet_.major, packet_.minor) == (3, minor)


@pytest.mark.parametrize(
    "code",
    [2 << 16, 4 << 16, (1234 << 16) | 5677, 80877105, -1, 0],
    ids=["2.0", "4.0", "1234.5677", "unknown-1234.x", "negative", "zero"],
)
def test_unknown_protocol_code_is_a_violation(code):
    with pytest.raises(pg.ProtocolViolation, match="unsupported frontend protocol"):
        pg.decode_first_packet(payload(code, b"user\0u\0\0"))


def test_first_packet_shorter_than_a_code_is_a_violation():
    with pytest.raises(pg.ProtocolViolation, match="too short"):
        pg.decode_first_packet(b"\0\3\0")


@pytest.mark.parametrize(
    "rest",
    [b"", b"user\0alice", b"user\0alice\0", b"user\0alice\0\1"],
    ids=["empty", "no-nul-at-all", "no-list-terminator", "junk-after-last-value"],
)
def test_startup_parameters_without_terminators_are_a_violation(rest):
    with pytest.raises(pg.ProtocolViolation, match="expected terminator as last byte"):
        pg.decode_first_packet(payload(pg.PROTOCOL_3_0, rest))


def test_startup_parameter_without_a_value_is_a_violation():
    with pytest.raises(pg.ProtocolViolation, match="without a value"):
        pg.decode_first_packet(payload(pg.PROTOCOL_3_0, b"user\0alice\0database\0\0"))


def test_startup_parameter_with_an_empty_name_is_a_violation():
    with pytest.raises(pg.ProtocolViolation, match="empty startup parameter name"):
        pg.decode_first_packet(payload(pg.PROTOCOL_3_0, b"\0alice\0\0"))


@pytest.mark.parametrize(
    "rest", [b"user\0\xff\0\0", b"\xc3\0alice\0\0"], ids=["value", "name"]
)
def test_startup_parameter_that_is_not_utf8_is_a_violation(rest):
    with pytest.raises(pg.ProtocolViolation, match="UTF-8"):
        pg.decode_first_packet(payload(pg.PROTOCOL_3_0, rest))


# --- encoders ----------------------------------------------------------------------


def test_error_response_carries_severity_sqlstate_message_and_hint():
    msg = parse(pg.error_response("28P01", "bad password", "try again"))
    assert msg.type == b"E"
    assert pg.decode_fields(msg.body) == {
        "S": "FATAL", "V": "FATAL", "C": "28P01", "M": "bad password", "H": "try again",
    }


def test_error_response_wire_layout_is_fields_then_a_terminating_nul():
    assert pg.error_response("08P01", "x", severity="ERROR") == (
        b"E\x00\x00\x00\x1d" b"SERROR\0" b"VERROR\0" b"C08P01\0" b"Mx\0" b"\0"
    )


def test_error_response_omits_absent_hint_and_includes_detail():
    fields = pg.decode_fields(parse(pg.error_response("3D000", "m", detail="d")).body)
    assert fields["D"] == "d"
    assert "H" not in fields


def test_notice_response_is_type_n_with_notice_severity():
    msg = parse(pg.notice_response("hello", "a hint", sqlstate="01000"))
    assert msg.type == b"N"
    assert pg.decode_fields(msg.body) == {
        "S": "NOTICE", "V": "NOTICE", "C": "01000", "M": "hello", "H": "a hint",
    }


def test_auth_ok_is_authentication_code_zero():
    assert pg.auth_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def test_auth_cleartext_is_authentication_code_three():
    assert pg.auth_cleartext() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"


def test_auth_sasl_lists_mechanisms_each_nul_terminated_then_a_final_nul():
    msg = parse(pg.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    code, data = pg.decode_authentication(msg.body)
    assert code == pg.AUTH_SASL
    assert data == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    assert pg.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


@pytest.mark.parametrize(
    ("encode", "code"),
    [(pg.auth_sasl_continue, pg.AUTH_SASL_CONTINUE), (pg.auth_sasl_final, pg.AUTH_SASL_FINAL)],
)
def test_sasl_continue_and_final_carry_their_data_verbatim(encode, code):
    assert pg.decode_authentication(parse(encode(b"r=abc,s=xyz")).body) == (code, b"r=abc,s=xyz")


def test_parameter_status_round_trips():
    msg = parse(pg.parameter_status("server_version", "15.4"))
    assert msg.type == b"S"
    assert pg.decode_parameter_status(msg.body) == ("server_version", "15.4")


def test_backend_key_data_round_trips_unsigned_values():
    msg = parse(pg.backend_key_data(0xFFFFFFFF, b"\xff" * 4))
    assert msg.type == b"K"
    assert pg.decode_backend_key_data(msg.body) == (0xFFFFFFFF, b"\xff" * 4)


def test_backend_key_data_of_protocol_3_2_carries_a_longer_secret():
    secret = bytes(range(32))
    msg = parse(pg.backend_key_data(42, secret))
    assert len(msg.body) == 36
    assert pg.decode_backend_key_data(msg.body) == (42, secret)


def test_ready_for_query_defaults_to_idle():
    assert pg.ready_for_query() == b"Z\x00\x00\x00\x05I"


def test_negotiate_protocol_version_lists_newest_minor_and_unsupported_options():
    assert pg.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]) == (
        b"v\x00\x00\x00\x1a" b"\x00\x00\x00\x00" b"\x00\x00\x00\x02" b"_pq_.a\0_pq_.b\0"
    )


def test_startup_message_round_trips_through_decode_first_packet():
    params = {"user": "alice", "database": "job_alpha", "options": "-c x=ü"}
    data = pg.startup_message(params)
    frames = pg.FrameBuffer()
    frames.feed(data)
    assert pg.decode_first_packet(frames.next_startup_packet()) == pg.StartupMessage(
        3, 0, params
    )
    assert len(frames) == 0


def test_cancel_request_round_trips_through_decode_first_packet():
    frames = pg.FrameBuffer()
    frames.feed(pg.cancel_request(42, b"\xde\xad\xbe\xef"))
    assert pg.decode_first_packet(frames.next_startup_packet()) == pg.CancelRequest(
        42, b"\xde\xad\xbe\xef"
    )


def test_ssl_request_is_an_eight_byte_packet_with_the_ssl_code():
    assert pg.ssl_request() == packet(pg.SSL_REQUEST_CODE)


def test_sasl_initial_response_round_trips():
    msg = parse(pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert msg.type == b"p"
    assert pg.decode_sasl_initial_response(msg.body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_sasl_initial_response_with_length_minus_one_has_no_data():
    body = b"SCRAM-SHA-256\0" + struct.pack("!i", -1)
    assert pg.decode_sasl_initial_response(body) == ("SCRAM-SHA-256", b"")


@pytest.mark.parametrize(
    "body",
    [b"SCRAM-SHA-256", b"SCRAM-SHA-256\0\0\0", b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"abc"],
    ids=["no-nul", "short-length", "length-mismatch"],
)
def test_malformed_sasl_initial_response_is_a_violation(body):
    with pytest.raises(pg.ProtocolViolation, match="SASLInitialResponse"):
        pg.decode_sasl_initial_response(body)


def test_password_message_body_decodes_to_its_text():
    assert pg.decode_password(parse(pg.password_message(b"s3cret\0")).body) == "s3cret"


@pytest.mark.parametrize("body", [b"s3cret", b"\xff\0"], ids=["unterminated", "not-utf8"])
def test_malformed_password_is_a_violation(body):
    with pytest.raises(pg.ProtocolViolation, match="password"):
        pg.decode_password(body)


def test_terminate_is_an_empty_x_message():
    assert pg.terminate() == b"X\x00\x00\x00\x04"
