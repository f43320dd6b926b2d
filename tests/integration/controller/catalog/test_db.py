"""The catalog against a real PostgreSQL: migrations, compare-and-set transitions, events,
wakes, failed attempts and retries, grants and NOTIFY."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import (
    JOBS_CHANNEL,
    PRINCIPALS_CHANNEL,
    CatalogError,
    Conflict,
    NotFound,
)
from jobmesh.controller.catalog.schema import MIGRATIONS

pytestmark = pytest.mark.timeout(60)


async def test_migrations_apply_once(catalog_dsn: str) -> None:
    cat = await Catalog.connect(catalog_dsn)
    try:
        assert await cat.migrate() == [1, 2, 3, 4, 5, 6, 7, 8]
        assert await cat.migrate() == []
    finally:
        await cat.close()


async def test_the_attempts_migration_applies_to_a_catalog_with_jobs(catalog_dsn: str) -> None:
    """A catalog made by the first release, with a job in it, gains the new columns."""
    cat = await Catalog.connect(catalog_dsn)
    try:
        async with cat.pool.acquire() as conn:
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                               " name text NOT NULL, applied_at timestamptz NOT NULL"
                               " DEFAULT now())")
            await conn.execute((MIGRATIONS / "0001_catalog.sql").read_text())
            await conn.execute("INSERT INTO schema_migrations VALUES (1, '0001_catalog.sql')")
            await conn.execute("INSERT INTO jobs (id, desired_state, state, backend_password,"
                               " error, attempts) VALUES ('old', 'running', 'creating', 'pw',"
                               " 'disk full', 2)")
        assert await cat.migrate() == [2, 3, 4, 5, 6, 7, 8]
        job = await cat.job("old")
        assert job is not None
        assert (job.error, job.attempts, job.next_attempt_at, job.gave_up) == (
            "disk full", 2, None, False)
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


async def test_a_failed_attempt_records_when_the_next_one_is_due(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    due = datetime.now(UTC) + timedelta(seconds=4)
    job = await catalog.failed_attempt("alpha", "creating", "disk full", next_attempt_at=due)
    assert job is not None
    assert (job.error, job.attempts, job.next_attempt_at, job.gave_up) == (
        "disk full", 1, due, False)
    job = await catalog.failed_attempt("alpha", "creating", "disk full")
    assert job is not None and job.attempts == 2 and job.next_attempt_at is None
    [first, _] = await catalog.events("alpha", kind="error")
    assert first.detail == {"error": "disk full", "next_attempt_at": due.isoformat()}


async def test_a_failed_attempt_given_up_on_is_marked_and_has_no_next_attempt(
        catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await catalog.failed_attempt("alpha", "creating", "disk full",
                                 next_attempt_at=datetime.now(UTC) + timedelta(seconds=1))
    job = await catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                       gave_up=True)
    assert job is not None
    assert (job.error, job.attempts, job.next_attempt_at, job.gave_up) == (
        "the dump does not load", 2, None, True)
    assert (await catalog.events("alpha", kind="error"))[-1].detail == {
        "error": "the dump does not load", "gave_up": True}


async def test_a_failed_attempt_of_a_job_that_moved_on_changes_nothing(
        catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await catalog.transition("alpha", "creating", "running")
    assert await catalog.failed_attempt("alpha", "creating", "late", gave_up=True) is None
    job = await catalog.job("alpha")
    assert job is not None and (job.error, job.attempts, job.gave_up) == (None, 0, False)


async def _given_up(catalog: Catalog, job_id: str = "alpha", state: str = "creating") -> None:
    job = await catalog.failed_attempt(job_id, state, "the dump does not load", gave_up=True)
    assert job is not None and job.gave_up


async def test_a_transition_clears_the_attempts_and_the_mark(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await _given_up(catalog)
    job = await catalog.transition("alpha", "creating", "running")
    assert job is not None
    assert (job.error, job.attempts, job.next_attempt_at, job.gave_up) == (None, 0, None, False)


async def test_retry_clears_the_mark_and_the_back_off_and_records_an_event(
        catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await _given_up(catalog)
    job = await catalog.retry("alpha")
    assert (job.attempts, job.next_attempt_at, job.gave_up) == (0, None, False)
    assert job.error == "the dump does not load"  # shown until an attempt succeeds
    [event] = await catalog.events("alpha", kind="retry")
    assert event.from_state == "creating"
    with pytest.raises(NotFound):
        await catalog.retry("nope")


async def test_a_new_desired_state_clears_the_mark_and_the_same_one_does_not(
        catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await _given_up(catalog)
    job = await catalog.set_desired("alpha", "running")  # what it already wanted
    assert job.gave_up
    job = await catalog.set_desired("alpha", "paused")
    assert (job.attempts, job.next_attempt_at, job.gave_up) == (0, None, False)


async def test_a_wake_clears_the_mark(catalog: Catalog) -> None:
    await catalog.create_job("alpha")
    await catalog.transition("alpha", "creating", "running")
    await catalog.set_desired("alpha", "paused")
    await catalog.transition("alpha", "running", "pausing")
    await _given_up(catalog, state="pausing")
    job = await catalog.request_wake("alpha")
    assert job is not None and job.desired_state == "running" and not job.gave_up


async def test_a_change_of_the_mark_or_the_next_attempt_alone_is_announced(
        catalog: Catalog) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()
    await catalog.create_job("alpha")
    conn = await catalog.listen({JOBS_CHANNEL: seen.put_nowait})  # after the create
    try:
        for change in ("gave_up = true", "next_attempt_at = now()"):
            await catalog.pool.execute(f"UPDATE jobs SET {change} WHERE id = 'alpha'")
            assert await asyncio.wait_for(seen.get(), 10) == "alpha"
    finally:
        await conn.close()


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


async def test_a_router_report_resets_the_idle_clocks_of_the_jobs_it_used(
        catalog: Catalog) -> None:
    for job in ("used", "ended-just-now", "idle"):
        await catalog.create_job(job)
    await catalog.pool.execute("UPDATE jobs SET last_active = now() - interval '1 hour'")
    await catalog.report_activity("r1", "127.0.0.1:6432", {"used": 2}, ["ended-just-now"], 15)
    fresh = {r["id"] for r in await catalog.pool.fetch(
        "SELECT id FROM jobs WHERE last_active > now() - interval '1 minute'")}
    assert fresh == {"used", "ended-just-now"}
    row = await catalog.pool.fetchrow("SELECT * FROM router_reports")
    assert (row["id"], row["listen"], row["clients"]) == ("r1", "127.0.0.1:6432", {"used": 2})
    await catalog.report_activity("r1", "127.0.0.1:6432", {}, [], 0)  # the router stops
    assert await catalog.pool.fetchval("SELECT count(*) FROM router_reports") == 0


async def test_a_router_report_still_touches_a_catalog_not_yet_migrated(
        catalog: Catalog) -> None:
    """Routers upgraded before the controller (which migrates) must not let jobs in use
    be idle-paused."""
    await catalog.create_job("used")
    await catalog.pool.execute("UPDATE jobs SET last_active = now() - interval '1 hour'")
    await catalog.pool.execute("DROP FUNCTION jobmesh_router_report")
    await catalog.report_activity("r1", "127.0.0.1:6432", {"used": 1}, [], 15)
    assert await catalog.pool.fetchval(
        "SELECT last_active > now() - interval '1 minute' FROM jobs WHERE id = 'used'")
