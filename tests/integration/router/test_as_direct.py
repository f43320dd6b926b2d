"""What a client sees of its backend through the router is what it would see direct:
the real backend pid (``pg_terminate_backend``, NOTIFY's sender), cancels that work,
and a cancel key that spraying cannot guess."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import psycopg
import pytest

from tests.support.cancels import send_cancel, sleep_and_cancel, waiting_victim

from .test_lifecycle import scrape

pytestmark = pytest.mark.timeout(90)

def _connect(router, **kw) -> psycopg.Connection:
    return psycopg.connect(router.dsn(**kw), connect_timeout=10, autocommit=True)


async def _aconnect(router) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=router.port, user="alice",
                                 password="s3cret", database="job_alpha", timeout=10)


def test_the_client_is_told_its_backends_real_pid(router):
    with _connect(router) as conn:
        assert conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]


async def test_asyncpg_is_told_its_backends_real_pid(router):
    conn = await _aconnect(router)
    try:
        assert conn.get_server_pid() == await conn.fetchval("select pg_backend_pid()")
    finally:
        await conn.close()


def test_pg_terminate_backend_of_a_clients_pid_ends_that_connection(router):
    with _connect(router) as victim, _connect(router) as other:
        pid = victim.info.backend_pid
        assert other.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        assert other.execute("select 1").fetchone() == (1,)


def test_notify_names_its_sender_as_the_sender_knows_itself(router):
    channel = f"ch_{secrets.token_hex(4)}"
    with _connect(router) as listener, _connect(router) as sender:
        listener.execute(f"listen {channel}")
        sender.execute(f"notify {channel}, 'hello'")
        [note] = list(listener.notifies(timeout=20, stop_after=1))
        assert (note.channel, note.payload) == (channel, "hello")
        assert note.pid == sender.info.backend_pid != listener.info.backend_pid


def test_a_protocol_3_2_client_gets_3_2_and_its_long_key_cancels(router):
    # Direct to PostgreSQL 15 this client would get 3.0 and a 4-byte key; the router speaks
    # 3.2 to it (the only change 3.2 makes: a longer cancel key) and 3.0 to the backend.
    dsn = router.dsn(max_protocol_version="3.2")
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        assert conn.info.pgconn.full_protocol_version == 30002
        assert conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]
    sleep_and_cancel(dsn)  # its 32-byte key is the only one the router would match


async def test_a_spray_of_wrong_keys_is_rate_limited_and_cancels_nothing(metrics_router):
    """The pid is real, so guessable: 300 random secrets at it from one address. The
    address has 20 misses in a burst, then about 2 a second, then is throttled; even the
    right key from it is dropped while it is. From another address the right key works."""
    r = metrics_router
    async with waiting_victim(r.port) as v:
        sprayed = 0
        while sprayed < 300:
            guess = secrets.randbits(32) - 2**31
            if guess != v.secret:
                await asyncio.to_thread(send_cancel, r.port, v.pid, guess)
                sprayed += 1
        await asyncio.to_thread(send_cancel, r.port, v.pid, v.secret)  # throttled: dropped
        assert await v.blocked() and not v.waiting.done()  # nothing cancelled it

        counts = scrape(r.metrics_port)

        def outcome(name: str) -> float:
            return counts.get(("jobmesh_router_cancel_requests_total", (("outcome", name),)), 0)

        assert outcome("unknown_key") >= 20 and outcome("rate_limited") >= 1
        assert outcome("unknown_key") + outcome("rate_limited") == 301
        assert outcome("forwarded") == 0

        await asyncio.to_thread(send_cancel, r.port, v.pid, v.secret, "127.0.0.2")
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(v.waiting, 20)
        assert scrape(r.metrics_port)[
            ("jobmesh_router_cancel_requests_total", (("outcome", "forwarded"),))] == 1
