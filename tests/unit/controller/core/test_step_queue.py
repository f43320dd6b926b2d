"""``StepQueue``: at most N steps of a kind at once, first come first served, places told."""

from __future__ import annotations

import asyncio

import pytest

from jobmesh.controller.core.step_queue import StepQueue
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(10)


async def test_steps_beyond_the_limit_wait_in_order_and_hear_their_place():
    queue = StepQueue("start", 2)
    said: dict[str, list[str]] = {}
    order: list[str] = []
    release = asyncio.Event()
    inside = 0
    most = 0

    async def step(job: str) -> None:
        nonlocal inside, most

        async def progress(text: str) -> None:
            said.setdefault(job, []).append(text)

        async with queue.turn(job, progress):
            inside += 1
            most = max(most, inside)
            order.append(job)
            await release.wait()
            inside -= 1

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(step(f"j{i}")))
        await asyncio.sleep(0)  # each joins the queue in turn
    await until(lambda: len(order) == 2 and len(queue.waiting) == 3, "two in, three queued",
                timeout=5, interval=0)
    assert order == ["j0", "j1"] and queue.waiting == ["j2", "j3", "j4"]
    await asyncio.sleep(0)
    assert said["j4"] == ["queued: 3rd of 3 waiting to start (2 at a time)"]
    release.set()
    await asyncio.gather(*tasks)
    assert order == [f"j{i}" for i in range(5)] and most == 2
    assert said["j2"] == ["queued: 1st of 1 waiting to start (2 at a time)"]  # its place held
    assert "j0" not in said and queue.running == 0 and queue.waiting == []


async def test_a_cancelled_waiter_leaves_its_place():
    queue = StepQueue("stop", 1)
    hold = asyncio.Event()

    async def quiet(_text: str) -> None:
        pass

    async def step(job: str) -> None:
        async with queue.turn(job, quiet):
            await hold.wait()

    first = asyncio.create_task(step("a"))
    second = asyncio.create_task(step("b"))
    third = asyncio.create_task(step("c"))
    await until(lambda: queue.waiting == ["b", "c"], "b and c queued", timeout=5, interval=0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert queue.waiting == ["c"]
    hold.set()
    await asyncio.gather(first, third)
    assert queue.running == 0
