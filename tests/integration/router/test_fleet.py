"""Many routers as one: a cancel that reaches a router which did not issue its key is
forwarded to the router that did, over an authenticated peer channel."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from jobmesh.agent.postgres import free_port
from tests.support.balancer import Balancer
from tests.support.cancels import send_cancel, sleep_and_cancel, waiting_victim
from tests.support.router import routes_toml

from .test_lifecycle import scrape

pytestmark = pytest.mark.timeout(120)

def _secret_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(secrets.token_hex(24) + "\n")
    path.chmod(0o600)
    return path


def _dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user=alice password=s3cret dbname=job_alpha"


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


def test_every_cancel_through_a_balancer_takes_effect(router_factory, pg, balancer,
                                                      tmp_path):
    routers = _fleet(router_factory, pg, _secret_file(tmp_path, "peer"), 2, "--workers", "2")
    lb = balancer([("127.0.0.1", r.port) for r in routers])
    # Round robin: a session and its cancel are two connections, so each cancel lands on
    # the other router than its session's (and on either of its two workers).
    for _ in range(6):
        sleep_and_cancel(_dsn(lb.port), _dsn(routers[0].port))
    counts = [scrape(r.metrics_port) for r in routers]
    to_peer = sum(c.get(("jobmesh_router_cancel_requests_total", (("outcome", "to_peer"),)), 0)
                  for c in counts)
    assert to_peer == 6


async def test_a_router_with_another_peer_secret_cannot_cancel(router_factory, pg, tmp_path):
    [issuer, good] = _fleet(router_factory, pg, _secret_file(tmp_path, "peer"))
    rogue = router_factory(routes_toml(pg), "--peer", f"127.0.0.1:{issuer.peer_port}",
                           "--peer-secret-file", str(_secret_file(tmp_path, "other")))
    async with waiting_victim(issuer.port) as v:
        await asyncio.to_thread(send_cancel, rogue.port, v.pid, v.secret)
        refused = ("jobmesh_router_cancel_requests_total", (("outcome", "peer_refused"),))
        assert scrape(issuer.metrics_port).get(refused) == 1
        assert await v.blocked() and not v.waiting.done()  # not cancelled

        await asyncio.to_thread(send_cancel, good.port, v.pid, v.secret)  # a true peer can
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(v.waiting, 20)


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


def test_a_cancel_cut_short_by_a_shutdown_is_answered_by_eof_alone(router_factory, pg,
                                                                   tmp_path):
    """libpq's cancel fails on any byte after its CancelRequest ("unexpected response
    from server"): a cancel still being asked of a peer when the router stops gets EOF,
    never an ErrorResponse (as before, when the stop's 57P01 reached it)."""
    silent = socket.create_server(("127.0.0.1", 0))  # a peer that accepts, never answers
    try:
        r = router_factory(routes_toml(pg), "--peer",
                           f"127.0.0.1:{silent.getsockname()[1]}", "--peer-secret-file",
                           str(_secret_file(tmp_path, "s")), "--connect-timeout", "30")
        with socket.create_connection(("127.0.0.1", r.port), timeout=20) as s:
            s.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest, as libpq sends first
            assert s.recv(1) == b"N"
            s.sendall(struct.pack("!iiIi", 16, 80877102, 4242, 1))  # a key nobody issued
            peer, _ = silent.accept()  # the router asks the peer, which says nothing
            with peer:
                r.proc.send_signal(signal.SIGTERM)
                assert s.recv(100) == b""  # EOF, nothing else
    finally:
        silent.close()
