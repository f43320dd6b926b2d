"""The status page's figures and words, and its guards' pure parts: no server here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobmesh.controller.catalog.states import JobState
from jobmesh.controller.web.guard import WebConfig, WebConfigError, host_name
from jobmesh.controller.web.limits import Budget, LoginLimiter
from jobmesh.controller.web.pages import safe_next
from jobmesh.controller.web.summary import (
    ListQuery,
    Pages,
    WakeStats,
    ago,
    describe,
    duration,
    percentile,
    size,
)


def test_percentiles_are_nearest_rank() -> None:
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_wakes_fall_into_their_buckets() -> None:
    stats = WakeStats.of([0.2, 0.3, 1.5, 4.0, 45.0])
    assert (stats.count, stats.p50, stats.p95) == (5, 1.5, 45.0)
    assert [(b.label, b.count) for b in stats.bars] == [
        ("< 0.5 s", 2), ("0.5-1 s", 0), ("1-2 s", 1), ("2-5 s", 1), ("5-10 s", 0),
        ("10-30 s", 0), ("> 30 s", 1)]
    assert [b.share for b in stats.bars][:3] == [1.0, 0.0, 0.5]
    empty = WakeStats.of([])
    assert empty.p50 is None and all(b.count == 0 for b in empty.bars)


def test_the_list_query_keeps_only_what_it_understands() -> None:
    q = ListQuery.parse({"sort": "size", "q": "Scrape_1%'; --", "page": "2"},
                        ["paused", "bogus", "paused", "running"])
    assert q == ListQuery((JobState.PAUSED, JobState.RUNNING), "size", "scrape_1--", 2)
    assert ListQuery.parse({"sort": "evil", "page": "x"}, []) == ListQuery()
    assert ListQuery.parse({"page": "-3"}, []).page == 1


def test_list_links_keep_the_filter() -> None:
    q = ListQuery((JobState.PAUSED,), "size", "scr", 3)
    assert q.link() == "?state=paused&sort=size&q=scr&page=3"
    assert q.link(page=4) == "?state=paused&sort=size&q=scr&page=4"
    assert q.link(sort="id") == "?state=paused&q=scr"  # a new order starts at page 1
    assert ListQuery().link() == "?"


def test_pages_cover_every_job() -> None:
    assert Pages.of(0, 1) == Pages(1, 1)
    assert Pages.of(1000, 3) == Pages(3, 10) and Pages.of(1000, 3).offset == 200
    assert Pages.of(1001, 99) == Pages(11, 11)  # past the end: the last page


def test_sizes_and_durations_read_as_people_say_them() -> None:
    assert [size(n) for n in (None, 0, 999, 1500, 2_500_000, 3_200_000_000)] == [
        "-", "0 B", "999 B", "1.5 kB", "2.5 MB", "3.2 GB"]
    assert [duration(s) for s in (None, 0.0123, 1.0, 2.5, 150, 7200, 200_000)] == [
        "-", "12 ms", "1 s", "2.5 s", "2 min", "2.0 h", "2.3 d"]
    now = datetime(2026, 12, 4, tzinfo=UTC)
    assert ago(now - timedelta(minutes=3), now) == "3 min ago"
    assert ago(now, now) == "just now" and ago(None, now) == "-"


def test_events_read_as_a_timeline() -> None:
    assert describe("transition", "pausing", "paused", 812.0, 3_000_000, {}, None) == \
        "pausing → paused in 812 ms, 3.0 MB stored"
    assert describe("transition", "resuming", "running", 1500.0, 2_000_000, {}, None) == \
        "resuming → running in 1.5 s, 2.0 MB restored"
    assert describe("desired", None, None, None, None, {"desired_state": "paused"},
                    "ops") == "asked to be paused by ops"
    assert describe("error", "running", None, None, None, {"error": "disk full",
                    "gave_up": True}, None) == \
        "running failed: disk full (given up: waits for a retry)"
    assert describe("idle", "running", None, None, None, {"idle_seconds": 600}, None) == \
        "idle for 10 min: pausing"


@pytest.mark.parametrize(("given", "kept"), [
    ("/jobs/a?x=1", "/jobs/a?x=1"), ("//evil.example/", "/"), ("https://evil.example", "/"),
    ("/\\evil.example", "/"), ("", "/"), (None, "/"), ("jobs", "/")])
def test_after_a_login_only_our_own_paths_are_followed(given: object, kept: str) -> None:
    assert safe_next(given) == kept


def test_login_budgets_refill_at_their_rate() -> None:
    b = Budget(burst=2, every=10.0)
    assert b.wait("a", 0.0) == 0
    b.spend("a", 0.0)
    b.spend("a", 0.0)
    assert b.wait("a", 0.0) == pytest.approx(10.0)
    assert b.wait("a", 5.0) == pytest.approx(5.0)
    assert b.wait("a", 10.0) == 0
    assert b.wait("b", 0.0) == 0  # another key has its own


def test_a_guesser_meets_the_names_budget_from_many_addresses() -> None:
    limiter = LoginLimiter()
    for i in range(10):
        assert limiter.wait(f"10.0.0.{i}", "root", 0.0) == 0
        limiter.failed(f"10.0.0.{i}", "root", 0.0)
    assert limiter.wait("10.0.0.99", "root", 0.0) > 0
    assert limiter.wait("10.0.0.99", "other", 0.0) == 0


def test_the_budget_forgets_refilled_keys_beyond_its_bound() -> None:
    b = Budget(burst=1, every=1.0)
    for i in range(Budget.MAX_KEYS + 1):
        b.spend(f"k{i}", float(i))
    assert len(b._buckets) < Budget.MAX_KEYS


def test_the_page_answers_to_loopback_and_its_origins() -> None:
    c = WebConfig(origins=("https://Status.Example.com",), listen_host="10.1.2.3")
    assert c.hosts == {"localhost", "127.0.0.1", "::1", "10.1.2.3", "status.example.com"}
    assert c.secure and c.cookie == "__Host-jobmesh_session"
    assert WebConfig(listen_host="0.0.0.0").hosts == {"localhost", "127.0.0.1", "::1"}
    assert not WebConfig().secure and WebConfig().cookie == "jobmesh_session"
    for bad in ("status.example.com", "https://x/path", "ftp://x", "https://u@x"):
        with pytest.raises(WebConfigError):
            WebConfig(origins=(bad,))


def test_host_names_lose_their_ports() -> None:
    assert [host_name(h) for h in ("a.b:80", "A.B", "[::1]:8080", "[::1]", "::1")] == [
        "a.b", "a.b", "::1", "::1", "::1"]
