"""Many routers as one: a cancel that reaches a router which did not issue its key is
forwarded to the router that did, over an authenticated peer channel."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from jobmesh.agent.postgres import free_port
from tests.support.balancer import Balancer
from tests.support.router import routes_toml
from tests.support.waiting import until

from .test_lifecycle import scrape

pytestmark = pytest.mark.timeout(120)

CANCEL_REQUEST_CODE = 80877102


def _secret_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(secrets.token_hex(24) + "\n")
    path.chmod(0o600)
    return path


def _fleet(router_factory, pg, secret: Path, count: int = 2, *flags: str) -> list:
    """``count`` routers, each a peer of all the others."""
    ports = [free_port() for _ in range(count)]
    routers = []
    for i, port in enumerate(ports):
        peers = [a for j, p in enumerate(ports) if j != i for a in ("--peer", f"127.0.0.1:{p}")]
        metrics = free_port()
        r = router_factory(routes_toml(pg), "--peer-listen", f"127.0.0.1:{port}", *peers,
                           "--peer-secret-file", str(secret), "--metrics",
                           f"127.0.0.1:{metrics}", *flags)
        r.metrics_port, r.peer_port = metrics, port
        routers.append(r)
    return routers


@pytest.fixture
def balancer(request) -> Iterator[Balancer]:
    made: list[Balancer] = []

    def make(backends: list[tuple[str, int]]) -> Balancer:
        b = Balancer(backends)
        made.append(b)
        return b

    yield make  # type: ignore[misc]
    for b in made:
        b.close()


def _dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user=alice password=s3cret dbname=job_alpha"


def _sleep_and_cancel(port: int, probe_port: int) -> None:
    """A pg_sleep on a connection through ``port`` and psycopg's cancel, also through it
    (watched through ``probe_port``)."""
    dsn = _dsn(port)
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        pid = conn.info.backend_pid
        errors: list[BaseException] = []

        def sleeper() -> None:
            try:
                conn.execute("select pg_sleep(60)")
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        t = threading.Thread(target=sleeper)
        t.start()
        with psycopg.connect(_dsn(probe_port), connect_timeout=10, autocommit=True) as probe:
            while t.is_alive():  # until it really sleeps, or the cancel would be ignored
                row = probe.execute("select wait_event from pg_stat_activity where pid = %s",
                                    (pid,)).fetchone()
                if row and row[0] == "PgSleep":
                    break
                t.join(0.02)
        conn.cancel_safe(timeout=10)
        t.join(30)
        assert not t.is_alive()
        assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors


def test_every_cancel_through_a_balancer_takes_effect(router_factory, pg, balancer,
                                                      tmp_path):
    routers = _fleet(router_factory, pg, _secret_file(tmp_path, "peer"), 2, "--workers", "2")
    lb = balancer([("127.0.0.1", r.port) for r in routers])
    # Round robin: a session and its cancel are two connections, so each cancel lands on
    # the other router than its session's (and on either of its two workers).
    for _ in range(6):
        _sleep_and_cancel(lb.port, routers[0].port)
    counts = [scrape(r.metrics_port) for r in routers]
    to_peer = sum(c.get(("jobmesh_router_cancel_requests_total", (("outcome", "to_peer"),)), 0)
                  for c in counts)
    assert to_peer == 6


def _send_cancel(port: int, pid: int, secret: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack("!iiIi", 16, CANCEL_REQUEST_CODE, pid, secret))
        assert s.recv(1) == b""


async def test_a_router_with_another_peer_secret_cannot_cancel(router_factory, pg, tmp_path):
    [issuer, good] = _fleet(router_factory, pg, _secret_file(tmp_path, "peer"))
    rogue = router_factory(routes_toml(pg), "--peer", f"127.0.0.1:{issuer.peer_port}",
                           "--peer-secret-file", str(_secret_file(tmp_path, "other")))
    lock = secrets.randbelow(2**31)
    holder = await asyncpg.connect(host="127.0.0.1", port=issuer.port, user="alice",
                                   password="s3cret", database="job_alpha", timeout=10)
    victim = await asyncpg.connect(host="127.0.0.1", port=issuer.port, user="alice",
                                   password="s3cret", database="job_alpha", timeout=10)
    try:
        await holder.execute("select pg_advisory_lock($1)", lock)
        waiting = asyncio.create_task(victim.execute("select pg_advisory_lock($1)", lock))
        pid, secret = victim.get_server_pid(), victim._protocol.backend_secret

        async def blocked() -> bool:
            return await holder.fetchval(
                "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid)

        await until(blocked, "the victim to wait for the lock")
        await asyncio.to_thread(_send_cancel, rogue.port, pid, secret)
        refused = ("jobmesh_router_cancel_requests_total", (("outcome", "peer_refused"),))
        assert scrape(issuer.metrics_port).get(refused) == 1
        assert await blocked() and not waiting.done()  # not cancelled

        await asyncio.to_thread(_send_cancel, good.port, pid, secret)  # a true peer can
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(waiting, 20)
    finally:
        await holder.close()
        await victim.close()


@pytest.mark.parametrize("flags", [("--peer", "127.0.0.1:1"), ("--peer-listen", "127.0.0.1:0")])
def test_peers_without_a_shared_secret_are_refused_in_one_line(tmp_path, flags):
    routes = tmp_path / "routes.toml"
    routes.write_text("")
    proc = subprocess.run([sys.executable, "-m", "jobmesh", "router", "--routes", str(routes),
                           *flags], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JOBMESH_ROUTER_PEER_SECRET_FILE": ""})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "jobmesh router: --peer-listen and --peer need --peer-secret-file: forwarded cancels are "
        "authenticated"], proc.stderr
