"""Prometheus metrics of the agent (served at ``GET /metrics`` by ``agent serve``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.archive_lag = Gauge(
            "jobmesh_agent_archive_lag_seconds",
            "Age of the oldest WAL segment waiting in the spool (0 when empty)", registry=r)
        self.wal_segments = Counter(
            "jobmesh_agent_wal_segments_uploaded_total", "WAL segments uploaded", registry=r)
        self.wal_bytes = Counter(
            "jobmesh_agent_wal_bytes_uploaded_total",
            "Compressed WAL bytes uploaded", registry=r)
        self.wal_push_seconds = Histogram(
            "jobmesh_agent_wal_push_seconds", "Time to compress and upload one WAL segment",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.snapshot_bytes = Counter(
            "jobmesh_agent_snapshot_bytes_total",
            "Compressed bytes uploaded in snapshots and base backups, by kind", ["kind"],
            registry=r)
        self.snapshot_seconds = Histogram(
            "jobmesh_agent_snapshot_seconds", "Duration of snapshots and base backups, by kind",
            ["kind"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r)
        self.failures = Counter(
            "jobmesh_agent_failures_total", "Failed operations, by kind", ["kind"], registry=r)
        self.wal_deltas = Counter(
            "jobmesh_agent_wal_deltas_uploaded_total",
            "Deltas of the unfinished WAL segment uploaded by the streamer", registry=r)
        self.wal_delta_bytes = Counter(
            "jobmesh_agent_wal_delta_bytes_uploaded_total",
            "Compressed bytes of streamed WAL deltas uploaded", registry=r)
        self.wal_streamed_lsn = Gauge(
            "jobmesh_agent_wal_streamed_lsn",
            "WAL position (bytes) up to which streamed WAL is in the store", registry=r)
        self.store_requests = Counter(
            "jobmesh_agent_store_requests_total", "Requests sent to the store, by kind",
            ["op"], registry=r)
        self.store_bytes_sent = Counter(
            "jobmesh_agent_store_bytes_sent_total", "Bytes uploaded to the store", registry=r)

    def count_request(self, op: str, requests: int, sent: int) -> None:
        """What a ``CountingStore`` reports, as metrics."""
        self.store_requests.labels(op).inc(requests)
        if sent:
            self.store_bytes_sent.inc(sent)
