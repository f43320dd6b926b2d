"""read_startup: which protocol the client is spoken to, and how long its cancel key is."""

from __future__ import annotations

import pytest

from jobmesh.router import protocol as pg
from jobmesh.router.startup import KEY_3_0, KEY_3_2, read_startup

PARAMS = {"user": "alice", "database": "job_alpha"}


def test_a_3_0_client_gets_3_0_and_a_4_byte_key() -> None:
    got = read_startup(pg.StartupMessage(3, 0, PARAMS))
    assert (got.negotiate, got.key_length) == (None, KEY_3_0) == (None, 4)


def test_a_3_2_client_gets_3_2_without_negotiation_and_a_32_byte_key() -> None:
    got = read_startup(pg.StartupMessage(3, 2, PARAMS))
    assert (got.negotiate, got.key_length) == (None, KEY_3_2) == (None, 32)


@pytest.mark.parametrize(("minor", "offered", "key"), [(1, pg.PROTOCOL_3_0, KEY_3_0),
                                                       (3, pg.PROTOCOL_3_2, KEY_3_2),
                                                       (0xFFFF, pg.PROTOCOL_3_2, KEY_3_2)])
def test_other_minors_are_offered_the_newest_the_router_speaks(minor: int, offered: int,
                                                               key: int) -> None:
    got = read_startup(pg.StartupMessage(3, minor, PARAMS))
    assert got.negotiate == pg.negotiate_protocol_version(offered, [])
    assert got.key_length == key


def test_unknown_protocol_options_are_named_back_at_the_version_asked() -> None:
    got = read_startup(pg.StartupMessage(3, 2, {**PARAMS, "_pq_.x": "1"}))
    assert got.negotiate == pg.negotiate_protocol_version(pg.PROTOCOL_3_2, ["_pq_.x"])
    assert "_pq_.x" not in got.forwarded and got.key_length == KEY_3_2
