"""The controller's store keeper: collects on its own, and on request.

After a job pauses (a ``transition`` event to ``paused``), it applies that
job's retention and collects; every ``interval`` it does the same for every
job. Jobs' policies come from their specs (``keep_pauses``,
``pitr_window``), else the controller's defaults. One collection runs at a
time (the collector's own lock also keeps other controllers out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from jobmesh.agent.store import Store, StoreError

from ..catalog.db import Catalog
from .gc import Collector, GcReport, JobUsage, StoreSurvey, survey, usage
from .retention import Retention

log = logging.getLogger("jobmesh.controller.keeper")

POLL = 10.0  # seconds between looks for new pauses (each look may collect once)


class Keeper:
    def __init__(self, store: Store, catalog: Catalog, default: Retention, *,
                 interval: float = 3600.0) -> None:
        self.collector = Collector(store)
        self.catalog = catalog
        self.default = default
        self.interval = interval
        self.last: GcReport | None = None

    async def policies(self) -> dict[str, Retention]:
        out = {}
        for job in await self.catalog.jobs():
            spec = job.spec or {}
            out[job.id] = Retention(
                keep_pauses=int(spec.get("keep_pauses", self.default.keep_pauses)),
                pitr_window=float(spec.get("pitr_window", self.default.pitr_window)))
        return out

    async def collect(self, jobs: list[str] | None = None, *,
                      dry_run: bool = False) -> GcReport:
        report = await self.collector.collect(await self.policies(), default=self.default,
                                              only=jobs, dry_run=dry_run)
        if not dry_run:
            self.last = report
        log.info("garbage collection%s: %d snapshots dropped, %d objects (%.1f MB) deleted, "
                 "%d incomplete uploads%s", f" after pauses of {', '.join(jobs)}" if jobs else "",
                 len(report.dropped_snapshots), report.deleted_objects,
                 report.deleted_bytes / 1e6, report.incomplete,
                 f"; deferred: {report.deferred}" if report.deferred else "")
        return report

    async def usage(self) -> dict[str, JobUsage]:
        return await usage(self.collector)

    async def survey(self) -> StoreSurvey:
        return await survey(self.collector)

    async def run(self, stop: asyncio.Event) -> None:
        """Collect after pauses and every ``interval`` until ``stop``."""
        seen = await self._last_pause_event()
        next_full = time.monotonic() + self.interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)
            if stop.is_set():
                return
            try:
                paused = await self._paused_since(seen)
                if paused:
                    seen = max(eid for eid, _ in paused)
                    await self.collect(sorted({j for _, j in paused}))
                if time.monotonic() >= next_full:
                    next_full = time.monotonic() + self.interval
                    await self.collect()
            except (StoreError, OSError) as exc:
                log.warning("garbage collection failed (the next one retries): %s", exc)
            except Exception:
                log.exception("garbage collection failed (the next one retries)")

    async def _last_pause_event(self) -> int:
        return int(await self.catalog.pool.fetchval(
            "SELECT coalesce(max(id), 0) FROM events WHERE kind = 'transition' "
            "AND to_state = 'paused'"))

    async def _paused_since(self, seen: int) -> list[tuple[int, str]]:
        rows = await self.catalog.pool.fetch(
            "SELECT id, job_id FROM events WHERE id > $1 AND kind = 'transition' "
            "AND to_state = 'paused' ORDER BY id LIMIT 100", seen)
        return [(int(r["id"]), str(r["job_id"])) for r in rows]
