"""Router-issued cancel keys, and where each one points.

Clients get a BackendKeyData the router made up, never the backend's own,
so a CancelRequest must come back through the router, which forwards it to
the right Postgres with the real key. Keys are looked up by pid and the
secret is compared in constant time, as Postgres does.

With several worker processes sharing one listening socket, a CancelRequest
may reach a worker other than the one holding the session. The issuing
worker is therefore encoded in the pid: ``pid % workers == worker``.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

_PID_LIMIT = 1 << 31  # BackendKeyData pids are read as signed int32 by some drivers


@dataclass(frozen=True, slots=True)
class BackendKey:
    host: str
    port: int
    pid: int
    secret: int


class CancelMap:
    def __init__(self, worker: int = 0, workers: int = 1) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} out of range for {workers} workers")
        self.worker = worker
        self.workers = workers
        self._seq = secrets.randbelow(_PID_LIMIT // workers - 1) + 1
        self._entries: dict[int, tuple[int, BackendKey]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def owner(self, pid: int) -> int:
        """The worker that issued ``pid``."""
        return pid % self.workers

    def issue(self, backend: BackendKey) -> tuple[int, int]:
        """A fresh (pid, secret) for the client, remembered until released."""
        while True:
            pid = self._seq * self.workers + self.worker
            self._seq += 1
            if self._seq * self.workers >= _PID_LIMIT:
                self._seq = 1
            if pid not in self._entries:
                break
        secret = secrets.randbits(32)
        self._entries[pid] = (secret, backend)
        return pid, secret

    def lookup(self, pid: int, secret: int) -> BackendKey | None:
        entry = self._entries.get(pid)
        if entry is None:
            return None
        expected, backend = entry
        if not hmac.compare_digest(expected.to_bytes(4, "big"), secret.to_bytes(4, "big")):
            return None
        return backend

    def release(self, pid: int) -> None:
        self._entries.pop(pid, None)
