"""The controller's Prometheus metrics: jobs by state, transition durations, wakes, bytes."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..catalog.states import JobState

_SECONDS = (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("jobmesh_jobs", "Jobs by lifecycle state (at the last resync)",
                          ["state"], registry=r)
        self.action_seconds = Histogram(
            "jobmesh_transition_seconds", "Duration of lifecycle work (create, pause, resume, ...)",
            ["action"], buckets=_SECONDS, registry=r)
        self.action_failures = Counter("jobmesh_transition_failures_total",
                                       "Lifecycle work that failed (retried)", ["action"],
                                       registry=r)
        self.wake_seconds = Histogram(
            "jobmesh_wake_seconds", "From a client's wake request to the job running",
            buckets=_SECONDS, registry=r)
        self.bytes_moved = Counter("jobmesh_bytes_moved_total",
                                   "Bytes stored by pauses and restored by resumes",
                                   ["direction"], registry=r)
        self.failures = Counter("jobmesh_job_failures_total",
                                "Jobs whose PostgreSQL stopped unexpectedly", registry=r)

    def set_job_states(self, states: Iterable[JobState]) -> None:
        counts = Tally(states)
        for state in JobState:
            self.jobs.labels(state).set(counts.get(state, 0))
