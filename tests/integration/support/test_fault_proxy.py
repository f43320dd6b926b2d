"""The fault proxy injects exactly what it claims, seen with plain HTTP requests through it.

Upstream is the session's moto S3 server; objects are written ``public-read``
so unsigned GETs work.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)
DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@pytest.fixture
def make_proxy(s3_server) -> Iterator[Callable[..., FaultProxy]]:
    """Start proxies in front of moto; every one is stopped when the test ends."""
    proxies: list[FaultProxy] = []

    def make(**kw) -> FaultProxy:
        proxy = FaultProxy(s3_server.endpoint, **kw)
        proxies.append(proxy)
        return proxy.start()

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.create_bucket(f"fp-{os.urandom(4).hex()}")


def request(endpoint: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"x-amz-acl": "public-read",
                                                        **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def upstream_has(s3_server, bucket: str, key: str) -> bool:
    status, _ = request(s3_server.endpoint, "HEAD", f"/{bucket}/{key}")
    return status == 200


def test_without_faults_requests_and_bodies_pass_unchanged(make_proxy, bucket, s3_server):
    proxy = make_proxy(rate=0.0)
    data = os.urandom(3 << 20)
    assert request(proxy.endpoint, "PUT", f"/{bucket}/obj", data)[0] == 200
    assert request(proxy.endpoint, "GET", f"/{bucket}/obj") == (200, data)
    assert request(s3_server.endpoint, "GET", f"/{bucket}/obj") == (200, data)
    assert proxy.counts == {"requests": 2, "relayed": 2}
    assert [(e.method, e.fault) for e in proxy.log] == [("PUT", None), ("GET", None)]


def test_error_faults_answer_s3_xml_errors_without_reaching_upstream(make_proxy, bucket,
                                                                     s3_server):
    proxy = make_proxy(rate=1.0, kinds=("500", "503"), seed=3)
    answers = [request(proxy.endpoint, "PUT", f"/{bucket}/k{i}", b"x" * 1000)
               for i in range(20)]
    assert {status for status, _ in answers} == {500, 503}
    for status, body in answers:
        code = re.search(rb"<Error><Code>(\w+)</Code>", body)
        assert code is not None, body
        assert code.group(1) == {500: b"InternalError", 503: b"SlowDown"}[status]
    assert proxy.counts["500"] + proxy.counts["503"] == 20 == proxy.injected()
    assert proxy.counts["500"] == sum(status == 500 for status, _ in answers)
    assert not any(upstream_has(s3_server, bucket, f"k{i}") for i in range(20))


def test_drop_request_hangs_up_mid_request_and_forwards_nothing(make_proxy, bucket, s3_server):
    proxy = make_proxy(rate=1.0, kinds=("drop_request",))
    with pytest.raises(DROPPED):
        request(proxy.endpoint, "PUT", f"/{bucket}/big", os.urandom(8 << 20))
    with pytest.raises(DROPPED):
        request(proxy.endpoint, "GET", f"/{bucket}/big")
    assert proxy.counts == {"requests": 2, "drop_request": 2}
    assert not upstream_has(s3_server, bucket, "big")


def test_drop_response_cuts_the_body_short_after_the_upstream_answered(make_proxy, bucket,
                                                                       s3_server):
    data = os.urandom(1 << 20)
    assert request(s3_server.endpoint, "PUT", f"/{bucket}/obj", data)[0] == 200
    proxy = make_proxy(rate=1.0, kinds=("drop_response",), seed=5)
    received = []
    for _ in range(5):
        with pytest.raises(http.client.IncompleteRead) as exc:
            request(proxy.endpoint, "GET", f"/{bucket}/obj")
        assert data.startswith(exc.value.partial)  # a true prefix, then the hang-up
        received.append(len(exc.value.partial))
    assert all(n < len(data) for n in received)
    assert len(set(received)) > 1  # the cut point is random
    # A request with a body: the upstream stored it, but the client never saw the answer.
    with pytest.raises(DROPPED):
        request(proxy.endpoint, "PUT", f"/{bucket}/written", b"payload")
    assert upstream_has(s3_server, bucket, "written")
    assert proxy.injected("drop_response") == 6


def test_delay_holds_the_answer_then_delivers_it_intact(make_proxy, bucket, s3_server):
    data = os.urandom(100_000)
    assert request(s3_server.endpoint, "PUT", f"/{bucket}/obj", data)[0] == 200
    proxy = make_proxy(rate=1.0, kinds=("delay",), delay=0.4)
    started = time.monotonic()
    assert request(proxy.endpoint, "GET", f"/{bucket}/obj") == (200, data)
    assert time.monotonic() - started >= 0.4
    assert proxy.counts == {"requests": 1, "delay": 1}


def test_share_of_faults_follows_the_rate_and_the_seed_fixes_the_sequence(make_proxy, bucket):
    def faults(seed: int) -> list[str | None]:
        proxy = make_proxy(rate=0.25, kinds=("500", "503"), seed=seed)
        for _ in range(200):
            request(proxy.endpoint, "HEAD", f"/{bucket}/none")
        assert proxy.counts["requests"] == 200
        assert proxy.counts["relayed"] + proxy.injected() == 200
        return [e.fault for e in proxy.log]

    first = faults(seed=11)
    assert 25 <= sum(f is not None for f in first) <= 75  # 50 expected; 4 sigma either side
    assert faults(seed=11) == first
    assert faults(seed=12) != first


def test_chunked_request_with_expect_continue_is_relayed(make_proxy, bucket, s3_server):
    proxy = make_proxy(rate=0.0)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"PUT /{bucket}/chunked HTTP/1.1\r\nHost: s3\r\nx-amz-acl: public-read\r\n"
                     "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    assert request(s3_server.endpoint, "GET", f"/{bucket}/chunked") == (200, b"hello world")
    assert proxy.log[0].headers["expect"] == "100-continue"


def test_stop_closes_open_connections_and_the_listener(make_proxy):
    proxy = make_proxy(rate=0.0)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"PUT /b/k HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
    assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"  # now waiting for the body
    proxy.stop()
    assert sock.recv(100) == b""
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    proxy.stop()  # idempotent


def test_unknown_fault_kind_is_refused(s3_server):
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultProxy(s3_server.endpoint, kinds=("explode",))
