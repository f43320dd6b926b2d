"""The catalog against a real PostgreSQL: migrations, compare-and-set transitions, events,
wakes, grants and NOTIFY."""

from __future__ import annotations

import asyncio

import pytest

from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import (
    JOBS_CHANNEL,
    PRINCIPALS_CHANNEL,
    CatalogError,
    Conflict,
)


async def test_migrations_apply_once(catalog_dsn: str) -> None:
    cat = await Catalog.connect(catalog_dsn)
    try:
        assert await cat.migrate() == [1]
        assert await cat.migrate() == []
    finally:
        await cat.close()


async def test_create_job_starts_creating_and_records_an_event(catalog: Catalog) -> None:
    job = await catalog.create_job("alpha", {"cpu": "500m"})
    assert (job.state, job.desired_state, job.spec) == ("creating", "running", {"cpu": "500m"})
    assert len(job.backend_password) >= 24
    kinds = [e.kind for e in await catalog.events("alpha")]
    assert kinds == ["created"]


async def test_create_job_twice_is_a_conflict(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    with pytest.raises(Conflict):
        await catalog.create_job("alpha")


@pytest.mark.parametrize("bad", ["", "Alpha", "-x", "a" * 60, "a b", "a/b"])
async def test_bad_job_ids_are_refused(catalog: Catalog, bad: str) -> None:
    with pytest.raises(CatalogError):
        await catalog.create_job(bad)


async def test_transition_is_compare_and_set(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    ran = await catalog.transition("alpha", "creating", "running", host="127.0.0.1", port=5999)
    assert ran is not None and (ran.host, ran.port) == ("127.0.0.1", 5999)
    assert await catalog.transition("alpha", "creating", "running") is None
    paused = await catalog.transition("alpha", "running", "paused")
    assert paused is not None and paused.host is None and paused.port is None
    steps = [(e.from_state, e.to_state) for e in await catalog.events("alpha", kind="transition")]
    assert steps == [("creating", "running"), ("running", "paused")]


async def test_request_wake_changes_the_row_once(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await catalog.transition("alpha", "creating", "running")
    await catalog.set_desired("alpha", "paused")
    await catalog.transition("alpha", "running", "paused")
    woken = await asyncio.gather(*(catalog.request_wake("alpha") for _ in range(20)))
    assert all(j is not None and j.desired_state == "running" for j in woken)
    assert len(await catalog.events("alpha", kind="wake-requested")) == 1


async def test_ended_jobs_are_not_woken(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await catalog.set_desired("alpha", "ended")
    job = await catalog.request_wake("alpha")
    assert job is not None and job.desired_state == "ended"


async def test_grants_are_listed_with_principals(catalog: Catalog) -> None:
    await catalog.create_principal("alice", "SCRAM-SHA-256$4096:c2FsdA==$a:b")
    await catalog.grant("alice", "scrape-*", "read")
    await catalog.grant("alice", "beta", "write")
    await catalog.grant("alice", "beta", "read")  # re-granting replaces the access
    (alice,) = await catalog.principals("alice")
    assert [(g.pattern, g.access) for g in alice.grants] == [("beta", "read"), ("scrape-*", "read")]
    await catalog.revoke("alice", "beta")
    (alice,) = await catalog.principals("alice")
    assert [g.pattern for g in alice.grants] == ["scrape-*"]


async def test_notify_announces_job_and_principal_changes(catalog: Catalog) -> None:
    seen: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    conn = await catalog.listen({
        JOBS_CHANNEL: lambda p: seen.put_nowait(("job", p)),
        PRINCIPALS_CHANNEL: lambda p: seen.put_nowait(("principal", p)),
    })
    try:
        await catalog.create_job("alpha")
        assert await asyncio.wait_for(seen.get(), 10) == ("job", "alpha")
        await catalog.touch(["alpha"])  # activity alone is not announced
        await catalog.create_principal("bob", "SCRAM-SHA-256$4096:c2FsdA==$a:b")
        assert await asyncio.wait_for(seen.get(), 10) == ("principal", "bob")
        await catalog.grant("bob", "*", "write")
        assert await asyncio.wait_for(seen.get(), 10) == ("principal", "bob")
    finally:
        await conn.close()
