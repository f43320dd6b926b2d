"""How `jobmesh job show` tells a job's failed attempts and what comes next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from jobmesh.controller.cli.jobs import attempts

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _job(**kw: Any) -> dict[str, Any]:
    return {"id": "alpha", "attempts": 0, "next_attempt_at": None, "gave_up": False, **kw}


def test_no_failed_attempt_is_just_the_count() -> None:
    assert attempts(_job(), NOW) == "0"


def test_a_retry_due_says_in_how_many_seconds() -> None:
    due = (NOW + timedelta(seconds=3.2)).isoformat()
    assert attempts(_job(attempts=3, next_attempt_at=due), NOW) == "3, next in 4 s"
    past = (NOW - timedelta(seconds=1)).isoformat()
    assert attempts(_job(attempts=3, next_attempt_at=past), NOW) == "3, next now"


def test_a_job_given_up_on_says_what_the_user_can_do() -> None:
    line = attempts(_job(attempts=1, gave_up=True), NOW)
    assert line.startswith("1, gave up: it will not be retried")
    assert "`jobmesh job retry alpha`" in line and "`jobmesh job delete alpha`" in line
