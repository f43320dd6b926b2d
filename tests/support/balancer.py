"""A tiny TCP balancer: each new connection goes to the next backend, round robin, as a
Kubernetes Service's does to its pods (about half of a client's cancels reach a router
other than its session's). Threads; stopped by ``close``, even when a test fails."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading


class Balancer:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self._next = itertools.cycle(backends)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                backend = socket.create_connection(next(self._next), timeout=10)
            except OSError:
                client.close()
                continue
            backend.settimeout(None)
            with self._lock:
                self._open |= {client, backend}
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()
            self._open.clear()
