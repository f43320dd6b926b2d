"""Leader election on a Lease, against the Kubernetes API emulator (real HTTP, real
resourceVersion conflicts): one leader at a time, a takeover when it stops renewing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from kubernetes import client

from jobmesh.controller.backends.kubernetes.leader import LeaderElector, LeaseConfig
from tests.support.k8s_emulator import K8sEmulator

pytestmark = pytest.mark.timeout(60)
NS = "jm"
DURATION = 3.0  # renewed every second; a holder gives up after 2 s without renewal


@pytest.fixture
def emulator() -> Iterator[K8sEmulator]:
    with K8sEmulator() as emu:
        yield emu
        assert emu.rejected == []


@pytest.fixture
async def api(emulator: K8sEmulator) -> AsyncIterator[client.ApiClient]:
    api_client = emulator.api_client()
    yield api_client
    await asyncio.to_thread(api_client.close)


def elector(api: client.ApiClient, identity: str, duration: float = DURATION) -> LeaderElector:
    return LeaderElector(api, LeaseConfig(NS, identity, duration=duration))


def holder(emulator: K8sEmulator) -> str | None:
    lease = emulator.get("leases", NS, "jobmesh-controller")
    return None if lease is None else lease["spec"].get("holderIdentity")


class Candidate:
    """An elector campaigning and, once it leads, holding, as the controller does."""

    def __init__(self, e: LeaderElector) -> None:
        self.elector = e
        self.stop = asyncio.Event()
        self.leading = asyncio.Event()
        self.result: bool | None = None  # what hold returned
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        if await self.elector.acquire(self.stop):
            self.leading.set()
            self.result = await self.elector.hold(self.stop)

    def crash(self) -> None:
        """Stop renewing without releasing (a killed process)."""
        self.task.cancel()

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def candidates(api: client.ApiClient) -> AsyncIterator[list[Candidate]]:
    made: list[Candidate] = []
    yield made
    for c in made:
        await c.close()


async def test_the_first_candidate_leads_and_the_second_waits(
        emulator: K8sEmulator, api: client.ApiClient, candidates: list[Candidate]) -> None:
    a = Candidate(elector(api, "a"))
    candidates.append(a)
    await asyncio.wait_for(a.leading.wait(), 5)
    b = Candidate(elector(api, "b"))
    candidates.append(b)
    await asyncio.sleep(DURATION * 2.5)  # the lease expires twice over unless renewed
    assert not b.leading.is_set()
    assert holder(emulator) == "a"
    lease = emulator.get("leases", NS, "jobmesh-controller")
    assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 3
    assert lease["spec"]["leaseTransitions"] == 0


async def test_another_takes_over_when_the_leader_stops_renewing(
        emulator: K8sEmulator, api: client.ApiClient, candidates: list[Candidate]) -> None:
    a = Candidate(elector(api, "a"))
    candidates.append(a)
    await asyncio.wait_for(a.leading.wait(), 5)
    b = Candidate(elector(api, "b"))
    candidates.append(b)
    await asyncio.sleep(1.5)
    a.crash()
    crashed = time.monotonic()
    # b sees the record unchanged for a lease duration on its own clock (measured from its
    # first sight of the last renewal, up to a renew period before the crash), trying
    # every renew period: at most a duration and two periods.
    await asyncio.wait_for(b.leading.wait(), DURATION + 2 * DURATION / 3 + 1)
    assert time.monotonic() - crashed >= DURATION - DURATION / 3 - 0.2  # not before expiry
    assert holder(emulator) == "b"
    assert emulator.get("leases", NS, "jobmesh-controller")["spec"]["leaseTransitions"] == 1


async def test_a_leader_that_stops_cleanly_hands_over_at_once(
        emulator: K8sEmulator, api: client.ApiClient, candidates: list[Candidate]) -> None:
    a = Candidate(elector(api, "a"))
    candidates.append(a)
    await asyncio.wait_for(a.leading.wait(), 5)
    b = Candidate(elector(api, "b"))
    candidates.append(b)
    await asyncio.sleep(0.5)
    await a.close()
    assert a.result is True  # it held the lease until told to stop
    # At once: the lease was given back on the way out (no holder, or b took it already),
    # so b takes it at its next try instead of waiting for it to expire. (Not timed: how
    # soon b's next try comes is the machine's business.)
    assert holder(emulator) in ("", "b")
    await asyncio.wait_for(b.leading.wait(), DURATION)
    assert holder(emulator) == "b"


async def test_a_leader_whose_lease_was_taken_knows_it_lost(
        emulator: K8sEmulator, api: client.ApiClient, candidates: list[Candidate]) -> None:
    a = Candidate(elector(api, "a"))
    candidates.append(a)
    await asyncio.wait_for(a.leading.wait(), 5)
    leases = client.CoordinationV1Api(api)
    lease = api.sanitize_for_serialization(
        await asyncio.to_thread(leases.read_namespaced_lease, "jobmesh-controller", NS))
    lease["spec"]["holderIdentity"] = "usurper"  # as if a's lease had expired elsewhere
    await asyncio.to_thread(leases.replace_namespaced_lease, "jobmesh-controller", NS, lease)
    await asyncio.wait_for(a.task, DURATION)
    assert a.result is False
    assert not a.elector.leading
    assert holder(emulator) == "usurper"


async def test_a_leader_that_cannot_reach_the_api_gives_up_before_its_lease_expires(
        candidates: list[Candidate]) -> None:
    emu = K8sEmulator().start()  # its own: it is stopped halfway
    try:
        with emu.api_client() as api:
            a = Candidate(elector(api, "a"))
            candidates.append(a)
            await asyncio.wait_for(a.leading.wait(), 5)
            await asyncio.sleep(0.2)
            assert emu.rejected == []
            cut = time.monotonic()
            await asyncio.to_thread(emu.stop)
            await asyncio.wait_for(a.task, DURATION * 2)
    finally:
        emu.stop()
    assert a.result is False
    # Renewed last at most a renew period before the cut; it gives up two thirds of a
    # duration after that renewal (plus one attempt's timeout): before anyone else may
    # take over, a duration after the last renewal they saw.
    assert time.monotonic() - cut < DURATION


async def test_of_many_candidates_starting_together_one_leads(
        emulator: K8sEmulator, api: client.ApiClient, candidates: list[Candidate]) -> None:
    many = [Candidate(elector(api, f"c{i}")) for i in range(6)]
    candidates.extend(many)
    await asyncio.wait([asyncio.create_task(c.leading.wait()) for c in many],
                       timeout=5, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(DURATION)
    leaders = [c.elector.config.identity for c in many if c.leading.is_set()]
    assert leaders == [holder(emulator)]
