"""Transaction pooling: a backend connection is a client's only while its transaction runs.

A job whose ``pool_mode`` is ``transaction`` shares ``pool_size`` backend
connections (per router process) among all its clients, as PgBouncer's
transaction mode. A client holds no backend while idle; its next message
takes one from the pool (or waits for one), and gives it back at the
``ReadyForQuery`` that says idle (``I``) once every request sent has been
answered.

The router follows both directions message by message (a header each), and
keeps a queue of the answers it expects from the backend, one entry per
request that gets one (``Parse`` -> ``ParseComplete``, ``Sync`` ->
``ReadyForQuery``...). That queue is what makes protocol-level named
prepared statements work, as PgBouncer 1.21's ``max_prepared_statements``:

- A client's ``Parse`` of statement ``s1`` is renamed to ``jm_<hash of its
  text and parameter types>``, the same name on every backend. A backend that
  has it already is not asked again: the client gets a ``ParseComplete`` made
  by the router, in its place in the answers.
- A ``Bind`` or ``Describe`` of ``s1`` on a backend that has not prepared it
  is preceded by the ``Parse`` (whose ``ParseComplete`` the client never
  sees). A ``Close`` of ``s1`` forgets it for this client and is answered by
  the router; backends keep it (at most ``max_prepared`` each, least
  recently used closed first).
- After an error the backend ignores everything until ``Sync``: so does the
  router (no entry, nothing sent), and the answers it was to make itself for
  that stretch are dropped, as a direct connection would never send them.

Session state cannot follow a client from one backend to the next. What the
router can see in the SQL text (``SET`` outside ``SET LOCAL``, ``LISTEN``,
session advisory locks, ``WITH HOLD`` cursors, SQL ``PREPARE``, temporary
tables that outlive the transaction) is refused with 0A000 before it runs;
``DEALLOCATE ALL`` and ``DISCARD ALL`` run, and the router forgets what it
had prepared on that backend; a lone ``DEALLOCATE name`` of the client's own
statement forgets it for that client and is answered by the router. What it
cannot see (``set_config(..., false)`` in a query) is the README's list.

At ~520 lines it is one class, ``TxClient``: both directions of one client's
message stream and the queue of answers that ties them, which only make sense
read together; the pool, the SQL checks and the server's side are their own
modules (``txpool``, ``txsql``, ``txserve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol as pg
from .cancel_map import BackendKey
from .txpool import PoolTimeout, TxBackend, Waiter
from .txsql import (
    FORGET_ALL,
    Unsupported,
    check_sql,
    raise_in_backend,
    statement_name,
    unsupported_error,
)

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 30  # a client message larger than PostgreSQL's own limit is a violation
HIGH_WATER = 1 << 20  # bytes a client may have buffered while it waits for a backend

# What ends the answer to each kind of request (one byte each, as the wire has them).
_PARSE, _BIND, _CLOSE, _DESCRIBE, _EXECUTE, _SYNC = b"1", b"2", b"3", b"Tn", b"CIs", b"Z"
PASS, SKIP, FAKE = 0, 1, 2  # what the router does with an entry's answer

_PARSE_COMPLETE = pg.message(b"1")
_CLOSE_COMPLETE = pg.message(b"3")


# Backend message types (as ints) that end no entry: rows, notices, notifications,
# parameter changes, COPY's data and its start, ParameterDescription.
_PASSIVE = frozenset(b"DNASdctGHW")
_HEADER = struct.Struct("!BI")

TakeNow = Callable[["TxClient"], "TxBackend | Waiter | None"]
Take = Callable[["TxClient", bool], Awaitable[TxBackend]]


class TxClient(asyncio.Protocol):
    """A client of a transaction-mode job, after its login: holds a backend per transaction.

    ``take_now`` gives a backend at once (an idle one), or queues the client (the pool is
    full: ``given`` is called back), or None: then ``take`` (a task) wakes the job or logs
    in. ``on_end`` runs once when the client is gone. Entries of ``expect``: [ends, action,
    extra], where ``ends`` are the message types that end the answer, ``action`` PASS /
    SKIP (the client never sees it) / FAKE (``extra`` is the answer, made here), and
    ``extra`` of a Parse sent is the statement it prepares (forgotten if it fails)."""

    def __init__(self, job_id: str, transport: asyncio.Transport, take_now: TakeNow,
                 take: Take, on_end: Callable[[TxClient], None],
                 timeout_error: Callable[[], bytes]) -> None:
        self.job_id = job_id
        self.transport = transport
        self.take_now = take_now
        self.take = take
        self.on_end = on_end
        self.timeout_error = timeout_error
        self.buf = bytearray()
        self.backend: TxBackend | None = None
        self.statements: dict[bytes, bytes] = {}  # client's name -> Parse body after the name
        self.expect: deque[list[Any]] = deque()
        self.skipping = False  # after an error: until Sync, as the backend does
        self.status = b"I"  # the last ReadyForQuery's transaction status
        self.busy = False  # taking a backend (queued, or a task logging in)
        self.taking: asyncio.Task[None] | None = None
        self.waiter: Waiter | None = None
        self.partial = b""  # a backend message cut by a read's end
        self.write_paused = False  # the client's socket buffer is full (backpressure)
        self.ended = False
        self.transactions = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_active = time.time()

    # --- the client's direction ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        pass  # set_protocol does not call it

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.buf += data
        if not self.busy:
            self._pump()
        elif len(self.buf) > HIGH_WATER:
            self.transport.pause_reading()  # until a backend takes what waits

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def start(self, pipelined: bytes) -> None:
        if pipelined:
            self.data_received(pipelined)

    def _pump(self) -> None:
        buf = self.buf
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        unpack = _HEADER.unpack_from
        while pos + 5 <= n:
            kind, length = unpack(buf, pos)
            if length < 4 or length > MAX_MESSAGE:
                self.fail(pg.error_response("08P01", f"invalid message length {length}"))
                return
            end = pos + 1 + length
            if end > n:
                break
            if kind == 0x58:  # Terminate: the client leaves
                self._send(out)
                self.transport.close()
                return
            if self.backend is None and not self._take_backend(out):
                break  # (what is left waits in buf for the backend)
            msg = bytes(buf[pos:end])
            pos = end
            self._request(kind, msg, out)
        if pos == n:
            buf.clear()
        elif pos:
            del buf[:pos]
        self._send(out)
        if self.backend is not None and not self.expect and self.status == b"I":
            self._give_back()  # everything was answered by the router itself: nothing is due

    def _send(self, out: list[bytes]) -> None:
        backend = self.backend
        if out and backend is not None and backend.transport is not None:
            backend.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.expect and self.expect[0][1] == FAKE:
            self._flush_fakes()

    def _take_backend(self, out: list[bytes]) -> bool:
        """Attach a backend at once (True), or start waiting for one (False)."""
        self._send(out)
        got = self.take_now(self)
        if isinstance(got, TxBackend):
            self._attach(got)
            return True
        self.busy = True
        if got is None:
            self.taking = asyncio.get_running_loop().create_task(self._taking(False))
        else:
            self.waiter = got
        return False

    def given(self, got: TxBackend | PoolTimeout | None) -> None:
        """The pool's answer to a queued client: a backend, a slot to log in on, or the
        end of its wait."""
        self.waiter = None
        if isinstance(got, PoolTimeout):
            self.busy = False
            self.fail(self.timeout_error())
        elif got is None:
            self.taking = asyncio.get_running_loop().create_task(self._taking(True))
        elif self.ended or got.closed:
            got.pool.release(got)
            if not self.ended:
                self.backend_lost()
        else:
            self.busy = False
            self._attach(got)
            self._pump()

    async def _taking(self, slot: bool) -> None:
        try:
            backend = await self.take(self, slot)
        except asyncio.CancelledError:
            return
        except ClientFailed as exc:
            self.taking = None
            self.busy = False
            self.fail(exc.error)
            return
        except Exception:
            log.exception("job %s: taking a backend failed", self.job_id)
            self.taking = None
            self.busy = False
            self.fail(pg.error_response("XX000", "internal error in the router"))
            return
        self.taking = None
        self.busy = False
        if self.ended or backend.closed:
            backend.pool.release(backend)
            if not self.ended:
                self.backend_lost()
            return
        self._attach(backend)
        self.transport.resume_reading()
        self._pump()

    def _attach(self, backend: TxBackend) -> None:
        backend.client = self
        self.backend = backend
        self.transactions += 1
        if self.write_paused and backend.transport is not None:
            backend.transport.pause_reading()

    # The client reads slower than its backend answers: stop reading the backend (as a
    # direct connection's backend waits on ClientWrite) until the client catches up.
    def pause_writing(self) -> None:
        self.write_paused = True
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    def notice(self, text: str) -> None:
        self.transport.write(pg.notice_response(text))

    def _request(self, kind: int, msg: bytes, out: list[bytes]) -> None:
        """One whole client message, with a backend attached."""
        backend = self.backend
        assert backend is not None
        expect = self.expect
        if self.skipping and kind != 0x53:  # the backend ignores all but Sync now
            return
        if kind == 0x51:  # Query
            try:
                verdict = check_sql(msg[5:-1].decode("utf-8", "replace"))
            except Unsupported as exc:
                msg = pg.query(raise_in_backend(self.job_id, exc))
                verdict = None
            if verdict == FORGET_ALL:  # the backend's statements go, every client's
                backend.prepared.clear()
                self.statements.clear()
            elif isinstance(verdict, bytes) and verdict in self.statements and \
                    self.status != b"E":
                # DEALLOCATE of one of this client's statements: forgotten for it, answered
                # here (backends keep it for their other clients)
                del self.statements[verdict]
                expect.append([_SYNC, FAKE, pg.message(b"C", b"DEALLOCATE\0")
                               + pg.ready_for_query(self.status)])
                return
            expect.append([_SYNC, PASS, None])
        elif kind == 0x42:  # Bind: portal, statement, the rest
            p_end = msg.index(b"\0", 5)
            s_end = msg.index(b"\0", p_end + 1)
            if s_end > p_end + 1:
                known = self._ensure(msg[p_end + 1:s_end], out)
                if known is None:
                    return
                msg = pg.message(b"B", msg[5:p_end + 1] + known + msg[s_end:])
            expect.append([_BIND, PASS, None])
        elif kind == 0x45:  # Execute
            expect.append([_EXECUTE, PASS, None])
        elif kind == 0x53:  # Sync
            self.skipping = False
            expect.append([_SYNC, PASS, None])
        elif kind == 0x50:  # Parse
            body = msg[5:]
            end = body.index(b"\0")
            name, rest = body[:end], body[end + 1:]
            try:
                if check_sql(rest[:rest.index(b"\0")].decode("utf-8", "replace")) == \
                        FORGET_ALL:
                    backend.reusable = False  # (run from a prepared statement: not followed)
            except Unsupported as exc:
                self._refuse(unsupported_error(self.job_id, exc))
                return
            if not name:
                expect.append([_PARSE, PASS, None])
            elif name in self.statements:
                self._refuse(pg.error_response(
                    "42P05", f'prepared statement "{name.decode("utf-8", "replace")}" '
                    "already exists", severity="ERROR"))
                return
            else:
                server = statement_name(rest)
                self.statements[name] = server + b"\0" + rest
                if server in backend.prepared:
                    backend.prepared.move_to_end(server)
                    expect.append([_PARSE, FAKE, _PARSE_COMPLETE])
                    return
                self._prepare(server, rest, out, PASS)
                return
        elif kind == 0x44:  # Describe: S or P, then a name
            name = msg[6:-1]
            if msg[5] == 0x53 and name:
                known = self._ensure(name, out)
                if known is None:
                    return
                msg = pg.message(b"D", b"S" + known + b"\0")
            expect.append([_DESCRIBE, PASS, None])
        elif kind == 0x43:  # Close: S or P, then a name
            name = msg[6:-1]
            if msg[5] == 0x53 and name:
                self.statements.pop(name, None)  # backends keep it for other clients
                expect.append([_CLOSE, FAKE, _CLOSE_COMPLETE])
                return
            expect.append([_CLOSE, PASS, None])
        elif kind == 0x46:  # FunctionCall
            expect.append([_SYNC, PASS, None])
        # Flush, CopyData, CopyDone, CopyFail: nothing of their own to answer
        out.append(msg)

    def _ensure(self, name: bytes, out: list[bytes]) -> bytes | None:
        """The backend's name for the client's statement ``name``, prepared on this backend
        first if need be; None (and the client told, as PostgreSQL would) if unknown."""
        known = self.statements.get(name)
        if known is None:
            self._refuse(pg.error_response(
                "26000", f'prepared statement "{name.decode("utf-8", "replace")}" does not '
                "exist", severity="ERROR"))
            return None
        cut = known.index(b"\0")
        server = known[:cut]
        backend = self.backend
        assert backend is not None
        prepared = backend.prepared
        if server in prepared:
            prepared.move_to_end(server)
        else:
            self._prepare(server, known[cut + 1:], out, SKIP)
        return server

    def _prepare(self, server: bytes, rest: bytes, out: list[bytes], action: int) -> None:
        backend = self.backend
        assert backend is not None
        while len(backend.prepared) >= backend.max_prepared:
            oldest, _ = backend.prepared.popitem(last=False)
            out.append(pg.message(b"C", b"S" + oldest + b"\0"))
            self.expect.append([_CLOSE, SKIP, None])
        backend.prepared[server] = None
        out.append(pg.message(b"P", server + b"\0" + rest))
        self.expect.append([_PARSE, action, server])

    def _refuse(self, error: bytes) -> None:
        """An error the router answers for the backend (in its place among the answers);
        then, as PostgreSQL, everything up to Sync is ignored."""
        self.expect.append([b"", FAKE, error])
        self.skipping = True

    # --- the backend's direction ---------------------------------------------------------

    def from_backend(self, data: bytes) -> None:
        if self.partial:
            data, self.partial = self.partial + data, b""
        n = len(data)
        pos = start = 0
        expect = self.expect
        out: list[bytes] = []
        release = False
        unpack = _HEADER.unpack_from
        while pos + 5 <= n:
            kind, length = unpack(data, pos)
            end = pos + 1 + length
            if end > n:
                break
            if kind in _PASSIVE or not expect:
                pos = end
                continue
            head = expect[0]
            if kind == 0x45:  # ErrorResponse
                pos = end
                if head[0] is _SYNC:
                    continue  # inside a simple Query: its ReadyForQuery ends it
                out.append(data[start:pos])
                start = pos
                self._failed()
                continue
            if kind not in head[0]:
                pos = end  # not what was expected: passed on as it is
                continue
            expect.popleft()
            if head[1] == SKIP:
                if pos > start:
                    out.append(data[start:pos])
                start = pos = end
            else:
                pos = end
                if kind == 0x5A:  # ReadyForQuery
                    self.status = data[end - 1:end]
                    release = self.status == b"I"
            if expect and expect[0][1] == FAKE:
                out.append(data[start:pos])
                start = pos
                while expect and expect[0][1] == FAKE:
                    out.append(expect.popleft()[2])
        if pos < n:
            self.partial = data[pos:]
        if out:
            out.append(data[start:pos])
            payload = b"".join(out)
        else:
            payload = data[start:pos] if start or pos < n else data
        if payload:
            self.bytes_out += len(payload)
            self.transport.write(payload)
        if release and not expect and not self.partial:
            self._give_back()

    def _failed(self) -> None:
        """An error in the extended protocol: the backend skips to the next Sync."""
        expect = self.expect
        backend = self.backend
        while expect and expect[0][0] is not _SYNC:
            ends, action, extra = expect.popleft()
            if ends is _PARSE and action != FAKE and extra and backend is not None:
                backend.prepared.pop(extra, None)  # not prepared after all
        if not expect:
            self.skipping = True

    def _flush_fakes(self) -> None:
        """Answers the router makes that are first in line (nothing is due before them)."""
        expect = self.expect
        out = []
        while expect and expect[0][1] == FAKE:
            out.append(expect.popleft()[2])
        payload = b"".join(out)
        self.bytes_out += len(payload)
        self.transport.write(payload)

    def _give_back(self) -> None:
        backend, self.backend = self.backend, None
        self.last_active = time.time()
        if backend is not None:
            if self.write_paused and backend.transport is not None:
                backend.transport.resume_reading()  # (its next client reads for itself)
            backend.pool.release(backend)
        if self.buf and not self.busy:
            self._pump()

    def backend_lost(self) -> None:
        """The backend went mid-transaction (PostgreSQL stopped or crashed)."""
        self.backend = None
        self.fail(pg.error_response(
            "08006", f"job_{self.job_id}'s server connection was lost",
            "The transaction did not complete; connect again.", severity="FATAL"))

    def current_cancel(self) -> BackendKey | None:
        """What a cancel of this client reaches: the backend running its transaction."""
        return self.backend.cancel if self.backend is not None else None

    # --- the end -----------------------------------------------------------------------

    def fail(self, error: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(error)
            self.transport.close()
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.taking is not None:
            self.taking.cancel()
        if self.waiter is not None:
            self.waiter.pool.forget(self.waiter)
            self.waiter = None
        backend, self.backend = self.backend, None
        if backend is not None:
            clean = not self.expect and self.status == b"I" and not self.partial
            if not clean:
                backend.reusable = False  # mid-transaction or mid-answer: never reused
            backend.pool.release(backend)
        with contextlib.suppress(Exception):
            self.transport.close()
        self.on_end(self)


class ClientFailed(Exception):
    """Taking a backend failed in a way the client is told (its error, as bytes)."""

    def __init__(self, error: bytes) -> None:
        super().__init__()
        self.error = error

