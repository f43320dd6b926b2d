"""ClientFeed: a client's Terminate is seen at its message boundary however the stream is
cut into chunks, and nothing else is held back or changed."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from jobmesh.router.splice import ClientFeed

TERMINATE = b"X\0\0\0\4"


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


# Bodies full of what a Terminate looks like: only boundaries may tell them apart.
bodies = st.lists(st.sampled_from([b"X", b"\0", b"\4", b"Q", b"abc"]), max_size=40).map(
    b"".join)
messages = st.lists(st.tuples(st.sampled_from([b"Q", b"P", b"B", b"d", b"X"]), bodies).filter(
    lambda m: m != (b"X", b"")), max_size=12)  # (an empty X is a Terminate)


def feed_all(stream: bytes, cuts: list[int]) -> tuple[bytes, int]:
    out: list[bytes] = []
    ended = []
    feed = ClientFeed(out.append, lambda: ended.append(1))
    at = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        if cut > at and not ended:
            feed(stream[at:cut])
        at = max(at, cut)
    return b"".join(out), len(ended)


@given(msgs=messages, terminate=st.booleans(), cuts=st.lists(st.integers(0, 10_000),
                                                                max_size=8))
def test_everything_but_a_terminate_reaches_the_backend_unchanged(msgs, terminate, cuts):
    before = b"".join(msg(k, b) for k, b in msgs)
    stream = before + (TERMINATE if terminate else b"")
    written, ended = feed_all(stream, cuts)
    assert ended == int(terminate)
    if terminate:
        assert written == before
    else:
        # a header cut at the very end is held until it is whole; all else went through
        assert before.startswith(written) and len(before) - len(written) < 5


def test_a_terminate_inside_a_message_body_is_data() -> None:
    stream = msg(b"d", TERMINATE * 3) + msg(b"Q", b"select 1\0")
    assert feed_all(stream, [3, 9, 14]) == (stream, 0)


def test_a_long_message_passes_in_chunks_without_parsing() -> None:
    big = msg(b"d", b"\0" * 100_000)
    out: list[bytes] = []
    feed = ClientFeed(out.append, lambda: None)
    for i in range(0, len(big), 8192):
        feed(big[i:i + 8192])
    assert b"".join(out) == big and feed.left == 0
