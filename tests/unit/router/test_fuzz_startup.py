"""Property tests: no byte sequence makes the startup parser misbehave.

Whatever a client sends, ClientHandshake either produces events or raises
ProtocolViolation (which the server turns into a 08P01 error); it never raises
anything else, never spins, and never buffers an announced oversize packet.
"""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobmesh.router import protocol as pg
from jobmesh.router.handshake import ClientHandshake, State

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

Outcome = tuple[list[object], bool]  # events produced, and whether it ended in a violation


def drive(chunks: list[bytes]) -> Outcome:
    """Feed ``chunks`` one at a time, pulling every event after each; stop once closed."""
    hs = ClientHandshake()
    events: list[object] = []
    budget = sum(len(c) for c in chunks) + 2 * len(chunks) + 2  # every event eats >= 5 bytes
    try:
        for chunk in chunks:
            if hs.state is State.CLOSED:
                break
            hs.receive_data(chunk)
            while hs.state is not State.CLOSED and (event := hs.next_event()) is not None:
                events.append(event)
                budget -= 1
                assert budget > 0, "next_event keeps returning events without consuming input"
    except pg.ProtocolViolation:
        return events, True
    return events, False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


# --- strategies ------------------------------------------------------------------

cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)

codes = st.one_of(
    st.sampled_from([pg.SSL_REQUEST_CODE, pg.GSSENC_REQUEST_CODE, pg.CANCEL_REQUEST_CODE,
                     pg.PROTOCOL_3_0]),
    st.integers(min_value=3 << 16, max_value=(3 << 16) | 0xFFFF),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)

param_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
                     max_size=20)
params = st.dictionaries(param_text.filter(bool), param_text, max_size=8)


@st.composite
def untyped_packets(draw) -> bytes:
    """A length-prefixed first packet: right framing, arbitrary or plausible contents."""
    code = draw(codes)
    rest = draw(st.one_of(
        st.binary(max_size=40),
        params.map(lambda p: b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                      for k, v in p.items()) + b"\0"),
        st.builds(lambda pid, secret: struct.pack("!II", pid, secret),
                  st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    ))
    return struct.pack("!ii", 8 + len(rest), code) + rest


typed_messages = st.builds(
    pg.message,
    st.one_of(st.sampled_from([b"p", b"X", b"Q", b"\0"]), st.binary(min_size=1, max_size=1)),
    st.binary(max_size=40),
)


@st.composite
def conversations(draw) -> bytes:
    first = draw(st.lists(untyped_packets(), min_size=1, max_size=3))
    later = draw(st.lists(typed_messages, max_size=5))
    tail = draw(st.binary(max_size=8))
    return b"".join(first) + b"".join(later) + tail


# --- ClientHandshake never fails in an unplanned way -----------------------------------


@FUZZ
@given(data=st.binary(max_size=300), cut_at=cuts)
def test_arbitrary_bytes_yield_events_or_a_protocol_violation(data, cut_at):
    drive(split(data, cut_at))  # any exception other than ProtocolViolation fails the test


@FUZZ
@given(data=conversations(), cut_at=cuts)
def test_framed_packets_with_random_contents_yield_events_or_a_protocol_violation(data, cut_at):
    drive(split(data, cut_at))


@FUZZ
@given(data=conversations(), cut_at=cuts)
def test_how_bytes_are_split_never_changes_the_outcome(data, cut_at):
    assert drive(split(data, cut_at)) == drive([data])


@FUZZ
@given(p=params, cut_at=cuts)
def test_any_startup_parameters_arrive_intact(p, cut_at):
    events, violated = drive(split(pg.startup_message(p), cut_at))
    assert (events, violated) == ([pg.StartupMessage(3, 0, p)], False)


@FUZZ
@given(pid=st.integers(0, 2**32 - 1), secret=st.binary(min_size=4, max_size=256),
       junk=st.binary(max_size=20))
def test_cancel_request_closes_whatever_follows(pid, secret, junk):
    events = drive([pg.cancel_request(pid, secret) + junk])
    assert events == ([pg.CancelRequest(pid, secret)], False)


# --- FrameBuffer refuses oversize packets from their length alone ----------------------------


@FUZZ
@given(length=st.integers(pg.MAX_STARTUP_PACKET + 1, 2**31 - 1), more=st.binary(max_size=20))
def test_oversize_startup_length_raises_as_soon_as_four_bytes_are_in(length, more):
    frames = pg.FrameBuffer()
    frames.feed(struct.pack("!i", length))
    try:
        frames.next_startup_packet()
    except pg.ProtocolViolation:
        return
    raise AssertionError(f"announced length {length} was accepted")


@FUZZ
@given(length=st.integers(-(2**31), 7))
def test_undersize_startup_length_raises_as_soon_as_four_bytes_are_in(length):
    frames = pg.FrameBuffer()
    frames.feed(struct.pack("!i", length))
    try:
        frames.next_startup_packet()
    except pg.ProtocolViolation:
        return
    raise AssertionError(f"announced length {length} was accepted")


@FUZZ
@given(kind=st.binary(min_size=1, max_size=1),
       length=st.integers(pg.MAX_AUTH_MESSAGE + 1, 2**32 - 1))
def test_oversize_auth_message_raises_as_soon_as_its_header_is_in(kind, length):
    frames = pg.FrameBuffer()
    frames.feed(kind + struct.pack("!I", length))
    try:
        frames.next_message(pg.MAX_AUTH_MESSAGE)
    except pg.ProtocolViolation:
        return
    raise AssertionError(f"announced length {length} was accepted")


# Packets of any announced length (in range or not) with cheap zero bodies, then junk.
def _packet(n: int) -> bytes:
    return struct.pack("!i", n) + (bytes(n - 4) if 8 <= n <= pg.MAX_STARTUP_PACKET else b"")


packet_streams = st.builds(
    lambda lengths, tail: b"".join(map(_packet, lengths)) + tail,
    st.lists(st.integers(8, pg.MAX_STARTUP_PACKET) | st.integers(-(2**31), 2**31 - 1),
             max_size=4),
    st.binary(max_size=16),
)


@FUZZ
@given(data=packet_streams, cut_at=cuts)
def test_frame_buffer_never_holds_more_than_one_packet_plus_what_was_fed(data, cut_at):
    frames = pg.FrameBuffer()
    for chunk in split(data, cut_at):
        before = len(frames)
        assert before < pg.MAX_STARTUP_PACKET
        frames.feed(chunk)
        assert len(frames) == before + len(chunk)
        try:
            while frames.next_startup_packet() is not None:
                pass
        except pg.ProtocolViolation:
            return


@FUZZ
@given(length=st.integers(8, pg.MAX_STARTUP_PACKET), cut_at=cuts)
def test_announced_in_range_packet_waits_for_exactly_its_length(length, cut_at):
    data = struct.pack("!i", length) + bytes(length - 4)
    frames = pg.FrameBuffer()
    chunks = split(data, cut_at)
    for chunk in chunks[:-1]:
        frames.feed(chunk)
        assert frames.next_startup_packet() is None
    frames.feed(chunks[-1])
    assert frames.next_startup_packet() == bytes(length - 4)
    assert len(frames) == 0
