"""Leader election on a ``coordination.k8s.io/v1`` Lease, so one controller replica reconciles.

Every replica serves the HTTP API; only the holder of the Lease (default
``jobmesh-controller``) runs the reconciler. The rules are client-go's:

- A candidate takes the Lease when nobody holds it, or when its record
  (holder, renew time, resourceVersion) has not changed for the lease's
  duration *as measured on the candidate's own clock since it first saw that
  record*. Clocks of different machines are never compared, so a skewed clock
  cannot steal a live lease; the price is that a takeover comes between one
  and about one and two thirds durations after the holder's last renewal.
- The holder renews every duration/3 by replacing the Lease with the
  resourceVersion it read: a write based on a stale read gets a 409, so two
  candidates can never both win the same record.
- A holder that has not renewed for two thirds of the duration (API down,
  partitioned, stalled) has lost: ``hold`` returns False well before anyone
  else may take over, and the caller stops acting at once (``controller.main``
  exits the process non-zero and lets the Deployment restart it; in-flight
  work is abandoned, which is safe because every backend step is idempotent
  and the next leader redoes it). A holder that stops cleanly releases the
  Lease, so the next one takes over at its next try instead of after a
  duration.

The client is synchronous; every call runs in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .client import one_line, raw

log = logging.getLogger("jobmesh.controller.leader")

LEASE_NAME = "jobmesh-controller"


def default_identity() -> str:
    """hostname-pid: the pod's name in a Deployment, unique per process on one machine."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    identity: str
    name: str = LEASE_NAME
    duration: float = 15.0  # seconds a lease stays valid without renewal

    @property
    def renew_every(self) -> float:
        return self.duration / 3

    @property
    def renew_deadline(self) -> float:
        """A holder unable to renew for this long gives up (before others may take over)."""
        return self.duration * 2 / 3


class LeaderElector:
    """One candidate. ``acquire`` until it leads, then ``hold`` until it stops or loses."""

    def __init__(self, api: client.ApiClient, config: LeaseConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._leases = client.CoordinationV1Api(api)
        self._clock = clock
        self._observed: tuple[Any, ...] | None = None  # the record last seen
        self._observed_at = 0.0  # when (our clock) it was first seen
        self.leading = False

    @property
    def holder(self) -> str | None:
        """Who held the lease when we last looked (None: not looked yet, or nobody)."""
        return (self._observed[0] or None) if self._observed else None

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Try every duration/3 until we lead (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            if await self._attempt() == "held":
                log.info("leading: lease %s/%s held by %s", self.config.namespace,
                         self.config.name, self.config.identity)
                self.leading = True
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.renew_every)
        return False

    async def hold(self, stop: asyncio.Event) -> bool:
        """Renew until ``stop`` (then release the lease and return True) or until the lease
        is lost (return False at once: the caller must stop acting as the leader)."""
        last_renewal = self._clock()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.renew_every)
            if stop.is_set():
                await self.release()
                return True
            while True:
                outcome = await self._attempt()
                if outcome == "held":
                    last_renewal = self._clock()
                    break
                if outcome == "taken":
                    log.error("lost the lease %s/%s: it is held by someone else",
                              self.config.namespace, self.config.name)
                    self.leading = False
                    return False
                left = last_renewal + self.config.renew_deadline - self._clock()
                if left <= 0:
                    log.error("lost the lease %s/%s: not renewed for %.1f s",
                              self.config.namespace, self.config.name,
                              self._clock() - last_renewal)
                    self.leading = False
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(self.config.renew_every / 4, left))
                if stop.is_set():
                    break

    async def release(self) -> None:
        """Give the lease up (when we hold it), so the next candidate need not wait."""
        if not self.leading:
            return
        self.leading = False
        try:
            await asyncio.to_thread(self._release)
            log.info("released the lease %s/%s", self.config.namespace, self.config.name)
        except Exception as exc:  # it expires on its own
            log.warning("cannot release the lease %s/%s: %s", self.config.namespace,
                        self.config.name, one_line(exc))

    # --- one attempt (in a thread) ------------------------------------------------------

    async def _attempt(self) -> str:
        """'held' (we hold it now), 'taken' (someone else validly does) or 'error'."""
        try:
            # A call that hangs must not outlast the renew deadline unnoticed.
            return await asyncio.wait_for(asyncio.to_thread(self._try_acquire_or_renew),
                                          self.config.renew_every * 1.5)
        except Exception as exc:
            log.warning("lease %s/%s: %s", self.config.namespace, self.config.name,
                        one_line(exc))
            return "error"

    def _try_acquire_or_renew(self) -> str:
        cfg = self.config
        now = _micro_time()
        try:
            lease = self._call(self._leases.read_namespaced_lease, cfg.name, cfg.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                    "spec": self._record(now, now, 0)}
            try:
                self._call(self._leases.create_namespaced_lease, cfg.namespace, body)
            except ApiException as exc2:
                if exc2.status == 409:
                    return "taken"  # another candidate created it first
                raise
            return "held"
        spec: dict[str, Any] = lease.get("spec") or {}
        meta: dict[str, Any] = lease.get("metadata") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), meta.get("resourceVersion"))
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        if holder and holder != cfg.identity:
            duration = float(spec.get("leaseDurationSeconds") or cfg.duration)
            if self._clock() < self._observed_at + duration:
                return "taken"
            log.info("lease %s/%s of %s expired: taking it over", cfg.namespace, cfg.name,
                     holder)
        ours = holder == cfg.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        acquired = (spec.get("acquireTime") or now) if ours else now
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": cfg.name, "namespace": cfg.namespace,
                             "resourceVersion": meta.get("resourceVersion")},
                "spec": self._record(acquired, now, transitions)}
        try:
            self._call(self._leases.replace_namespaced_lease, cfg.name, cfg.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return "taken"  # written since we read it: someone else won
            raise
        return "held"

    def _call(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        return raw(fn, *args, timeout=self.config.renew_every)

    def _record(self, acquired: str, renewed: str, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.config.identity,
                "leaseDurationSeconds": max(1, round(self.config.duration)),
                "acquireTime": acquired, "renewTime": renewed,
                "leaseTransitions": transitions}

    def _release(self) -> None:
        cfg = self.config
        lease = self._call(self._leases.read_namespaced_lease, cfg.name, cfg.namespace)
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != cfg.identity:
            return
        now = _micro_time()
        spec = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": now}
        lease["spec"] = spec
        self._call(self._leases.replace_namespaced_lease, cfg.name, cfg.namespace, lease)


def _micro_time() -> str:
    """A MicroTime, as the API writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
