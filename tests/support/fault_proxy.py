"""A fault-injecting HTTP proxy for tests: put it between a client and an S3 API (moto).

    with FaultProxy(s3_server.endpoint, rate=0.2, seed=7) as proxy:
        store = S3Store(bucket, "p", endpoint=proxy.endpoint)
        ...
        assert proxy.injected() > 0

It reads each request (head and body, framed by Content-Length or chunked),
then for a seeded-random share ``rate`` of requests injects one fault:

- ``500`` / ``503``: answers an S3 XML error (InternalError / SlowDown) itself;
  the upstream never sees the request, so a retry is always safe.
- ``drop_request``: hangs up part-way through reading the request, no answer.
- ``drop_response``: forwards the request, then hangs up part-way through the
  answer: after the head and a random share of the body, or before its first
  byte when it has no body.
- ``delay``: forwards the request and holds the answer ``delay`` seconds.

``unsupported`` (header names) plays an S3 API older than a feature: every request
carrying one of them is answered ``501 NotImplemented``, whatever ``rate`` says.

Everything else is relayed unchanged, one upstream connection per client
connection. ``Expect: 100-continue`` is answered by the proxy itself, so the
fault can be chosen before the body moves. The proxy runs its own event loop
in a background thread, so sync and async tests can use it alike; ``counts``
and ``log`` say what it did.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit

KINDS = ("500", "503", "drop_request", "drop_response", "delay")
_S3_ERRORS = {"500": ("Internal Server Error", "InternalError"),
              "503": ("Service Unavailable", "SlowDown"),
              "501": ("Not Implemented", "NotImplemented")}  # (for ``unsupported`` only)


@dataclass(frozen=True)
class Event:
    method: str
    target: str
    headers: dict[str, str]
    fault: str | None  # None: relayed unchanged


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.2, kinds: tuple[str, ...] = KINDS,
                 seed: int = 0, delay: float = 0.5, host: str = "127.0.0.1",
                 unsupported: tuple[str, ...] = ()) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.host, self.port = host, 0
        self.rate, self.kinds, self.delay = rate, tuple(kinds), delay
        self.unsupported = {h.lower() for h in unsupported}
        self._rng = random.Random(seed)  # used on the proxy's loop thread only
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._log: list[Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def counts(self) -> collections.Counter[str]:
        """``requests``, ``relayed`` and one count per fault kind (a copy)."""
        with self._lock:
            return collections.Counter(self._counts)

    @property
    def log(self) -> list[Event]:
        with self._lock:
            return list(self._log)

    def injected(self, kind: str | None = None) -> int:
        counts = self.counts
        return counts[kind] if kind else sum(counts[k] for k in KINDS)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.host, self.port))
                self.port = server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(self._close_connections())
            loop.close()

        self._thread = threading.Thread(target=main, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    async def _close_connections(self) -> None:
        await asyncio.sleep(0)  # handlers of connections just accepted start (and register)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread (idempotent)."""
        if self._thread is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- one client connection ------------------------------------------------------

    def _choose(self, method: str, target: str, headers: dict[str, str]) -> str | None:
        fault = self._rng.choice(self.kinds) if self.kinds and self._rng.random() < self.rate \
            else None
        with self._lock:
            self._counts["requests"] += 1
            self._counts[fault or "relayed"] += 1
            self._log.append(Event(method, target, headers, fault))
        return fault

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if not head:
                    return
                method, target, headers = _parse_head(head)
                if self.unsupported & set(headers):
                    fault = "501"
                    with self._lock:
                        self._counts["requests"] += 1
                        self._counts["501"] += 1
                else:
                    fault = self._choose(method, target, headers)
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _without_header(head, b"expect")
                body = _body(reader, headers)
                if fault == "drop_request":
                    async for _ in body:
                        break  # take the first piece of the body, if any, and hang up
                    return
                if fault in _S3_ERRORS:
                    async for _ in body:
                        pass
                    writer.write(_s3_error(fault, target))
                    await writer.drain()
                    continue
                if upstream is None or upstream[0].at_eof():  # none yet, or closed when idle
                    if upstream is not None:
                        upstream[1].close()
                    upstream = await asyncio.open_connection(*self.upstream)
                up_reader, up_writer = upstream
                up_writer.write(head)
                async for piece in body:
                    up_writer.write(piece)
                    await up_writer.drain()
                rhead = await _read_head(up_reader)
                while rhead.startswith(b"HTTP/1.1 1"):  # interim answers: not ours to relay
                    rhead = await _read_head(up_reader)
                if not rhead:
                    return
                status, rheaders = _parse_status(rhead)
                no_body = method == "HEAD" or status in (204, 304)
                rbody = _body(up_reader, rheaders, response=True, no_body=no_body)
                if fault == "delay":
                    await asyncio.sleep(self.delay)
                if fault == "drop_response":
                    length = int(rheaders.get("content-length", "0") or 0)
                    if length and not no_body:  # else the answer is lost without a byte
                        writer.write(rhead)
                        await _relay(rbody, writer, limit=self._rng.randrange(length))
                        await writer.drain()
                    return
                writer.write(rhead)
                await _relay(rbody, writer)
                if "close" in (headers.get("connection", "") + rheaders.get("connection", "")
                               ).lower():
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    w.close()


# --- HTTP/1.1 framing -------------------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request or status line and headers, or b"" at a clean end of stream."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""


def _headers(lines: list[bytes]) -> dict[str, str]:
    out = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    first, *rest = head[:-4].split(b"\r\n")
    method, target, _version = first.decode("latin-1").split(" ", 2)
    return method, target, _headers(rest)


def _parse_status(head: bytes) -> tuple[int, dict[str, str]]:
    first, *rest = head[:-4].split(b"\r\n")
    return int(first.split(b" ", 2)[1]), _headers(rest)


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head[:-4].split(b"\r\n")
    keep = [ln for ln in lines if ln.split(b":", 1)[0].strip().lower() != name]
    return b"\r\n".join(keep) + b"\r\n\r\n"


async def _body(reader: asyncio.StreamReader, headers: dict[str, str], *,
                response: bool = False, no_body: bool = False) -> AsyncIterator[bytes]:
    """The raw bytes of a message body (chunked framing included), piece by piece."""
    if no_body:
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            yield line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    yield trailer
                yield trailer
                return
            yield await reader.readexactly(size + 2)
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            piece = await reader.read(min(left, 1 << 16))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            yield piece
    elif response:  # delimited by the end of the connection
        while piece := await reader.read(1 << 16):
            yield piece


async def _relay(body: AsyncIterator[bytes], writer: asyncio.StreamWriter,
                 limit: int | None = None) -> None:
    sent = 0
    async for piece in body:
        if limit is not None and sent + len(piece) >= limit:
            writer.write(piece[: limit - sent])
            return
        writer.write(piece)
        sent += len(piece)
        await writer.drain()


def _s3_error(status: str, target: str) -> bytes:
    reason, code = _S3_ERRORS[status]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by the fault proxy</Message><Resource>{target}</Resource>"
            f"<RequestId>fault-proxy</RequestId></Error>").encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
