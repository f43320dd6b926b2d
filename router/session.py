"""A spliced client/backend pair and what the router remembers about it."""

from __future__ import annotations

import itertools
import time

from . import tcp_info
from .backend_handshake import KeyData
from .pool import PoolKey
from .routes import JobRoute
from .splice import ClientFeed, Pipe
from .transaction import TxClient

_IDS = itertools.count(1)


class Session:
    """A spliced client/backend pair."""

    __slots__ = (
        "_at_splice", "_final", "_seen", "backend_pid", "cancel_secret", "connected_at", "feed",
        "id", "job", "pipes", "reuse", "slot", "tx", "user",
    )

    def __init__(self, job: JobRoute, user: str, cancel_secret: bytes, backend_pid: int,
                 slot: object | None) -> None:
        self.job = job
        self.user = user
        self.cancel_secret = cancel_secret  # with backend_pid: the client's cancel key
        self.backend_pid = backend_pid
        self.slot = slot
        self.id = next(_IDS)  # the admin console's client id (KILL_CLIENT)
        self.connected_at = time.time()
        # what pooling its backend needs once the client leaves (None: not pooled)
        self.reuse: tuple[PoolKey, KeyData, list[bytes]] | None = None
        self.feed: ClientFeed | None = None  # its client's writer, when pooled
        self.pipes: tuple[Pipe, Pipe] | None = None
        self.tx: TxClient | None = None  # transaction mode: the client, holding no backend
        # Counts are in "client socket" terms: bytes the client sent, bytes it acked.
        self._at_splice: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
        self._seen = (0, 0)  # the highest counts reported so far: counters never go down
        self._final: tuple[int, int] | None = None

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def spliced(self, pipes: tuple[Pipe, Pipe]) -> None:
        self.pipes = pipes
        client = tcp_info.socket_bytes(pipes[0].transport) or (0, 0)
        backend = tcp_info.socket_bytes(pipes[1].transport) or (0, 0)
        self._at_splice = (client, backend)

    def byte_counts(self) -> tuple[int, int]:
        """(bytes from the client, bytes to the client), as the kernel counted them."""
        if self._final is not None:
            return self._final
        if self.tx is not None:
            return self.tx.bytes_in, self.tx.bytes_out
        if self.pipes is None:
            return self._seen
        counts = tcp_info.socket_bytes(self.pipes[0].transport)
        if counts is not None:
            self._seen = _at_least(counts, self._seen)
        return self._seen

    def freeze_bytes(self, survivor: Pipe) -> None:
        """Record final counts from whichever socket is still open."""
        assert self.pipes is not None
        counts = tcp_info.socket_bytes(survivor.transport)
        if counts is not None and survivor is self.pipes[1]:
            # The client hung up first: what the backend socket moved since the
            # splice is what was relayed, on top of the client's handshake bytes.
            (c_rx, c_tx), (b_rx, b_tx) = self._at_splice
            counts = (c_rx + counts[1] - b_tx, c_tx + counts[0] - b_rx)
        self._final = _at_least(counts or (0, 0), self._seen)

    def close(self) -> None:
        if self.tx is not None:
            self.tx.transport.close()
        if self.pipes is not None:
            self.pipes[0].transport.close()
            self.pipes[1].transport.close()


def _at_least(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), max(a[1], b[1])
