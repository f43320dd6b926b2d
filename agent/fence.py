"""Fencing: one incarnation of a job writes to its store prefix at a time.

Every incarnation of a job (a create, a wake, a recovery) gets a
*generation* from the catalog, a number that only grows. Before it restores
or uploads anything, the incarnation *claims* its generation in the store::

    generations/<generation:012d>.json     who claimed it, and when

An incarnation whose generation is no longer the newest claimed is *stale*:
a pod on a partitioned node, a process the controller believes dead. It
must stop writing, and what it wrote after the newer claim must not count:

- ``FencedStore`` wraps the agent's store and looks at the claims before
  every manifest (what makes a snapshot, base backup or dump count), before
  every delete, and at most every ``FENCE_INTERVAL`` seconds before other
  uploads; a newer claim raises ``Fenced`` and calls ``on_fenced`` once (the
  agent then stops its PostgreSQL and exits).
- Upload names carry the generation where two incarnations could otherwise
  write the same name (streamed WAL deltas), and manifests record it, so the
  store never overwrites one incarnation's object with another's.
- Restores ignore what a stale incarnation wrote: a restore forces a new
  timeline when an incarnation may have run after the snapshot it restores
  (``superseded``), and skips snapshots that are not on the newest
  timeline's history (``restore.py``).

Generation 0 means unfenced (the agent's commands run by hand, stores written
before generations existed). This is the scheme Neon's pageservers use for
their remote storage, reduced to what a single-writer Postgres needs.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from .manifest import job_prefix, now_iso
from .store import ObjectInfo, Store, Stored, StoreError, put_bytes

log = logging.getLogger("jobmesh.agent.fence")

FENCE_INTERVAL = 30.0  # s: uploads other than manifests look at the claims this often, at most


class Fenced(StoreError):
    """A newer incarnation of the job has claimed the store: this one must stop writing."""

    def __init__(self, job: str, generation: int, newer: int) -> None:
        super().__init__(f"job {job}: generation {generation} is fenced off: generation {newer} "
                         "has claimed the store (a newer incarnation of the job runs "
                         "elsewhere); this one stops writing")
        self.generation = generation
        self.newer = newer


def claims_prefix(job: str) -> str:
    return f"{job_prefix(job)}generations/"


def claim_key(job: str, generation: int) -> str:
    return f"{claims_prefix(job)}{generation:012d}.json"


def parse_claim_key(job: str, key: str) -> int | None:
    rest = key.removeprefix(claims_prefix(job))
    if rest == key or not rest.endswith(".json") or not rest[:-5].isdigit():
        return None
    return int(rest[:-5])


async def claimed(store: Store, job: str) -> list[int]:
    """Every generation claimed for ``job``, oldest first."""
    found = (parse_claim_key(job, o.key) for o in await store.list(claims_prefix(job)))
    return sorted(g for g in found if g is not None)


async def claim(store: Store, job: str, generation: int) -> list[int]:
    """Claim ``generation`` for ``job`` (idempotent: the catalog hands each one out once);
    returns the generations claimed before it. Raises Fenced when a newer one is claimed."""
    if generation < 1:
        raise ValueError(f"a generation is >= 1, not {generation}")
    existing = await claimed(store, job)
    if existing and existing[-1] > generation:
        raise Fenced(job, generation, existing[-1])
    if generation not in existing:
        record = {"job": job, "generation": generation, "claimed_at": now_iso(),
                  "host": socket.gethostname(), "pid": os.getpid()}
        await put_bytes(store, claim_key(job, generation),
                        json.dumps(record, sort_keys=True).encode() + b"\n")
        log.info("job %s: generation %d claimed", job, generation)
    return [g for g in existing if g < generation]


def superseded(snapshot_generation: int, before: list[int]) -> bool:
    """Did an incarnation start after the one that took a snapshot (and so may have run,
    and may still run, on the snapshot's timeline)? ``before`` are the generations
    claimed before the restoring one."""
    return bool(snapshot_generation and before and before[-1] > snapshot_generation)


def _counts(key: str) -> bool:
    """Writing ``key`` makes something count: a snapshot's or a dump's manifest."""
    return key.endswith("/manifest.json") or ("/dumps/" in key and key.endswith(".json"))


class FencedStore:
    """The agent's store, refusing to write once a newer generation has claimed the job."""

    def __init__(self, inner: Store, job: str, generation: int, *,
                 interval: float = FENCE_INTERVAL,
                 on_fenced: Callable[[Fenced], None] | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.endpoint = getattr(inner, "endpoint", None)  # restore_command needs it (S3)
        self.job = job
        self.generation = generation
        self.interval = interval
        self.on_fenced = on_fenced
        self.fenced: Fenced | None = None
        self._checked = 0.0  # monotonic time of the last look at the claims

    async def check(self) -> None:
        """Raise Fenced when a newer generation has claimed the job (and remember it)."""
        if self.fenced is None:
            self._checked = time.monotonic()
            newer = [g for g in await claimed(self.inner, self.job) if g > self.generation]
            if newer:
                self.fenced = Fenced(self.job, self.generation, newer[-1])
                log.error("%s", self.fenced)
                if self.on_fenced is not None:
                    self.on_fenced(self.fenced)
        if self.fenced is not None:
            raise self.fenced

    async def _before_write(self, key: str) -> None:
        if (self.fenced is not None or _counts(key)
                or time.monotonic() - self._checked >= self.interval):
            await self.check()

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        await self._before_write(key)
        return await self.inner.put(key, chunks)

    async def put_new(self, key: str, data: bytes) -> bool:
        await self._before_write(key)
        return await self.inner.put_new(key, data)

    def get(self, key: str) -> AsyncGenerator[bytes, None]:
        return self.inner.get(key)

    async def size(self, key: str) -> int | None:
        return await self.inner.size(key)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        await self.check()
        await self.inner.delete(key)

    async def delete_many(self, keys: builtins.list[str]) -> None:
        if keys:
            await self.check()
            await self.inner.delete_many(keys)

    async def close(self) -> None:
        await self.inner.close()
