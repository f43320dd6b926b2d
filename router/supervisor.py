"""``jobmesh router --workers N``: one listening socket, N worker processes.

A single event loop uses one core, and on a busy machine the kernel gives a
single process one share of CPU however much traffic it carries. Workers
let the router use every core, as nginx and Envoy do. The supervisor:

- creates the listening socket and hands it to each worker (the kernel
  spreads accepted connections over the workers that are waiting);
- makes a control directory where workers meet: per-worker Unix sockets
  (cancel forwarding, metrics) and the per-job slot lock files;
- forwards SIGHUP (reload) and SIGTERM/SIGINT (drain and stop);
- restarts a worker that dies, and serves the merged metrics of all workers.

Limits: per-job ``max_connections`` is exact across workers (see
``slots.py``); ``--max-client-conn`` is divided evenly between workers, as
each PgBouncer process under ``so_reuseport`` has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .peers import fetch_metrics

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, argv: list[str], workers: int, host: str, port: int,
                 metrics_at: tuple[str, int] | None) -> None:
        self.argv = argv
        self.workers = workers
        self.host = host
        self.port = port
        self.metrics_at = metrics_at
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False

    def run(self) -> int:
        self.sock = socket.create_server((self.host, self.port), backlog=4096)
        self.control_dir = Path(tempfile.mkdtemp(prefix="jobmesh-router-"))
        try:
            return uvloop.run(self._main())
        finally:
            self.sock.close()
            shutil.rmtree(self.control_dir, ignore_errors=True)

    def _worker_cmd(self, index: int) -> list[str]:
        return [
            sys.executable, "-m", "jobmesh", *self.argv,
            "--worker-index", str(index), "--workers", str(self.workers),
            "--listen-fd", str(self.sock.fileno()), "--control-dir", str(self.control_dir),
        ]

    async def _spawn(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._worker_cmd(index), pass_fds=[self.sock.fileno()], stdout=asyncio.subprocess.PIPE
        )
        # Known at once, so a SIGTERM during start-up reaches it and is waited for.
        self.procs[index] = proc
        assert proc.stdout is not None
        line = await proc.stdout.readline()  # the worker prints "ready" once it serves
        if line.strip() != b"ready":
            await proc.wait()
            raise RuntimeError(f"router worker {index} failed to start (exit {proc.returncode})")

    async def _main(self) -> int:
        await asyncio.gather(*(self._spawn(i) for i in range(self.workers)))
        if self.metrics_at is not None:
            registry = CollectorRegistry()
            registry.register(_MergedWorkers(self.control_dir, self.workers))
            start_http_server(self.metrics_at[1], self.metrics_at[0], registry=registry)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        port = self.sock.getsockname()[1]
        log.info("router listening on %s:%d (%d workers)", self.host, port, self.workers)
        watchers = [asyncio.create_task(self._watch(i)) for i in range(self.workers)]
        await stop.wait()
        self.stopping = True
        self._forward(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in self.procs.values()))
        for w in watchers:
            w.cancel()
        log.info("router stopped")
        return 0

    async def _watch(self, index: int) -> None:
        while True:
            code = await self.procs[index].wait()
            if self.stopping:
                return
            log.error("router worker %d exited with %s; restarting it", index, code)
            try:
                await self._spawn(index)
            except RuntimeError as exc:
                log.error("%s", exc)
                return

    def _forward(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)


class _MergedWorkers(Collector):
    """Sums every worker's samples (counters, gauges, histogram buckets) by labels."""

    def __init__(self, control_dir: Path, workers: int) -> None:
        self._dir = control_dir
        self._workers = workers

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for i in range(self._workers):
            try:
                text = fetch_metrics(self._dir, i)
            except OSError as exc:
                log.warning("metrics of router worker %d unavailable: %s", i, exc)
                continue
            for fam in text_string_to_metric_families(text):
                families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                bucket = sums.setdefault(fam.name, {})
                for s in fam.samples:
                    if s.name.endswith("_created"):
                        continue  # creation timestamps do not add up
                    key = (s.name, tuple(sorted(s.labels.items())))
                    bucket[key] = bucket.get(key, 0.0) + s.value
        for name, metric in families.items():
            for (sample_name, labels), value in sums[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric
