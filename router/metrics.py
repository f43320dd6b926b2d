"""Prometheus metrics for the router.

Per-byte counters are not touched on the hot path: each spliced session's
pipes count into plain ints, and a collector folds live sessions plus the
totals of finished ones into the exposition at scrape time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SessionView(Protocol):
    @property
    def job_id(self) -> str: ...

    def byte_counts(self) -> tuple[int, int]: ...  # (from client, to client)


class RouterMetrics:
    def __init__(self, sessions: Callable[[], Iterable[SessionView]] = tuple) -> None:
        self.registry = CollectorRegistry()
        self.auth_failures = Counter(
            "jobmesh_router_auth_failures_total",
            "Client authentications that failed at the router",
            registry=self.registry,
        )
        self.errors = Counter(
            "jobmesh_router_errors_total",
            "ErrorResponses the router sent to clients, by SQLSTATE",
            ["sqlstate"],
            registry=self.registry,
        )
        self.backend_connect = Histogram(
            "jobmesh_router_backend_connect_seconds",
            "Time from starting a backend connection to its ReadyForQuery",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.cancels = Counter(
            "jobmesh_router_cancel_requests_total",
            "CancelRequests received, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        # Wakes (catalog routes only).
        self.wakes_requested = Counter(
            "jobmesh_router_wakes_requested_total",
            "Wakes this router asked the catalog for (one per job, however many clients wait)",
            registry=self.registry,
        )
        self.wake_wait = Histogram(
            "jobmesh_router_wake_wait_seconds",
            "Time a client waited for its job to wake, from AuthenticationOk to the job running",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.clients_held = Counter(
            "jobmesh_router_clients_held_total",
            "Clients held because their running job's PostgreSQL did not answer (a crash)",
            registry=self.registry,
        )
        self.clients_waiting = Gauge(
            "jobmesh_router_clients_waiting",
            "Authenticated clients waiting for their job to wake",
            registry=self.registry,
        )
        self.catalog_synced = Gauge(
            "jobmesh_router_catalog_synced",
            "1 while the router follows the catalog (LISTEN connected, cache loaded), else 0",
            registry=self.registry,
        )
        self.server_idle = Gauge(
            "jobmesh_router_server_connections_idle",
            "Backend connections clients left, reset and kept for the job's next clients",
            ["job"],
            registry=self.registry,
        )
        self.server_reused = Counter(
            "jobmesh_router_server_connections_reused_total",
            "Clients served by a kept backend connection (no fork, no login)",
            registry=self.registry,
        )
        self.server_not_kept = Counter(
            "jobmesh_router_server_connections_not_kept_total",
            "Backend connections closed when their client left: not idle (in a transaction,"
            " COPY or mid-query), or the reset failed",
            registry=self.registry,
        )
        self.finished_bytes: Tally[tuple[str, str]] = Tally()
        self._collector = _SessionCollector(sessions, self.finished_bytes)
        self.registry.register(self._collector)

    def track_sessions(self, sessions: Callable[[], Iterable[SessionView]]) -> None:
        """Where the live sessions are (set by the server that owns them)."""
        self._collector.sessions = sessions

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sessions live on this loop; scrapes from other threads read them there."""
        self._collector.loop = loop

    def byte_totals(self, sessions: Iterable[SessionView]) -> Tally[tuple[str, str]]:
        """Bytes relayed per (job, direction), finished sessions' and live ones'."""
        totals = Tally(self.finished_bytes)
        for s in sessions:
            rx, tx = s.byte_counts()
            totals[(s.job_id, "in")] += rx
            totals[(s.job_id, "out")] += tx
        return totals

    def session_finished(self, session: SessionView) -> None:
        rx, tx = session.byte_counts()
        self.finished_bytes[(session.job_id, "in")] += rx
        self.finished_bytes[(session.job_id, "out")] += tx


class _SessionCollector(Collector):
    def __init__(
        self,
        sessions: Callable[[], Iterable[SessionView]],
        finished: Tally[tuple[str, str]],
    ) -> None:
        self.sessions = sessions
        self._finished = finished
        self.loop: asyncio.AbstractEventLoop | None = None

    def collect(self) -> Iterable[Metric]:
        loop = self.loop
        if loop is None or _running_loop() is loop:
            yield from self._collect()
            return
        # prometheus_client serves scrapes from its own threads, while sessions
        # come and go on the event loop: take the snapshot on the loop's thread.
        done: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def snapshot() -> None:
            try:
                done.set_result(list(self._collect()))
            except Exception as exc:  # handed to the scraping thread
                done.set_exception(exc)

        loop.call_soon_threadsafe(snapshot)
        yield from done.result(timeout=10)

    def _collect(self) -> Iterable[Metric]:
        conns = GaugeMetricFamily(
            "jobmesh_router_client_connections",
            "Client connections spliced to a job's backend",
            labels=["job"],
        )
        nbytes = CounterMetricFamily(
            "jobmesh_router_bytes",
            "Bytes relayed, by job and direction (in: client to backend)",
            labels=["job", "direction"],
        )
        per_job: Tally[str] = Tally()
        totals = Tally(self._finished)
        for s in self.sessions():
            per_job[s.job_id] += 1
            rx, tx = s.byte_counts()
            totals[(s.job_id, "in")] += rx
            totals[(s.job_id, "out")] += tx
        for job, n in sorted(per_job.items()):
            conns.add_metric([job], n)
        for (job, direction), n in sorted(totals.items()):
            nbytes.add_metric([job, direction], n)
        yield conns
        yield nbytes


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
