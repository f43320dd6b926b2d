"""Cancel keys the router issued, and the backend each one points to.

A client's BackendKeyData carries its backend's real pid (what
``pg_backend_pid()`` says, what NOTIFY names as the sender) and a secret the
router made: 4 random bytes for a protocol 3.0 client, 32 for a 3.2 one. A
CancelRequest must therefore come back through the router, which forwards
it to the right Postgres with the backend's own key.

A real pid is small, guessable, and the same pid runs in many pods, so the
secret is all that protects one tenant's queries from another's cancels:
none of its bits say which worker or router issued it. A cancel this worker
does not know is asked of the sibling workers and the peer routers instead
(``cancel.py``), and misses are rate-limited per source address. Secrets
are compared in constant time, as Postgres does.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackendKey:
    host: str
    port: int
    pid: int
    secret: bytes  # the backend's own


# What a key points to: a backend, or (transaction mode) whichever backend runs the
# client's transaction now (None: none does, nothing to cancel).
Target = BackendKey | Callable[[], BackendKey | None]


class CancelMap:
    def __init__(self) -> None:
        # pid -> the keys issued with it (pids repeat across pods: usually one each)
        self._entries: dict[int, list[tuple[bytes, Target]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def issue(self, backend: BackendKey, length: int = 4) -> bytes:
        """A fresh secret for the client of ``backend`` (whose pid the client is told),
        remembered until released."""
        return self.issue_for(backend.pid, backend, length)

    def issue_for(self, pid: int, backend: Target, length: int = 4) -> bytes:
        keys = self._entries.setdefault(pid, [])
        while True:
            secret = secrets.token_bytes(length)
            if all(s != secret for s, _ in keys):
                break
        keys.append((secret, backend))
        self._count += 1
        return secret

    def lookup(self, pid: int, secret: bytes) -> Target | None:
        found = None
        for expected, backend in self._entries.get(pid, ()):
            if hmac.compare_digest(expected, secret):
                found = backend
        return found

    def release(self, pid: int, secret: bytes) -> None:
        keys = self._entries.get(pid)
        if keys is None:
            return
        kept = [(s, b) for s, b in keys if s != secret]
        self._count -= len(keys) - len(kept)
        if kept:
            self._entries[pid] = kept
        else:
            del self._entries[pid]
