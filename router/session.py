"""A spliced client/backend pair and what the router remembers about it."""

from __future__ import annotations

from router import tcp_info
from router.routes import JobRoute
from router.splice import Pipe


class Session:
    """A spliced client/backend pair."""

    __slots__ = ("_final_bytes", "backend_pid", "cancel_pid", "job", "pipes", "slot", "user")

    def __init__(self, job: JobRoute, user: str, cancel_pid: int, backend_pid: int,
                 slot: object | None) -> None:
        self.job = job
        self.user = user
        self.cancel_pid = cancel_pid
        self.backend_pid = backend_pid
        self.slot = slot
        self.pipes: tuple[Pipe, Pipe] | None = None
        self._final_bytes: tuple[int, int] | None = None

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def byte_counts(self) -> tuple[int, int]:
        """(bytes from the client, bytes to the client), as the kernel counted them."""
        if self._final_bytes is not None:
            return self._final_bytes
        if self.pipes is None:
            return 0, 0
        return tcp_info.socket_bytes(self.pipes[0].transport) or (0, 0)

    def freeze_bytes(self, survivor: Pipe) -> None:
        """Record final counts from whichever socket is still open."""
        assert self.pipes is not None
        counts = tcp_info.socket_bytes(survivor.transport) or (0, 0)
        if survivor is self.pipes[1]:  # backend socket: its sent bytes came from the client
            counts = (counts[1], counts[0])
        self._final_bytes = counts

    def close(self) -> None:
        if self.pipes is not None:
            self.pipes[0].transport.close()
            self.pipes[1].transport.close()
