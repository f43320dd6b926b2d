"""A job's row as a value: the attempt columns, and rows of a catalog not yet migrated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from jobmesh.controller.catalog.models import Job

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _row(**kw: Any) -> dict[str, Any]:
    row = dict(id="a", state="creating", desired_state="running", host=None, port=None,
               agent_url=None, backend_password="pw", spec={}, progress=None, error=None,
               attempts=0, last_active=NOW, created_at=NOW, updated_at=NOW,
               next_attempt_at=None, gave_up=False)
    return {**row, **kw}


def test_a_job_shows_its_attempts_next_attempt_and_whether_it_gave_up() -> None:
    due = NOW + timedelta(seconds=4)
    job = Job.from_row(_row(error="disk full", attempts=3, next_attempt_at=due))
    public = job.public()
    assert (public["error"], public["attempts"], public["next_attempt_at"], public["gave_up"]) \
        == ("disk full", 3, due.isoformat(), False)
    job = Job.from_row(_row(error="the dump does not load", attempts=1, gave_up=True))
    assert job.gave_up and job.public()["gave_up"] is True
    assert job.public()["next_attempt_at"] is None


def test_a_row_of_a_catalog_not_yet_migrated_reads_as_nothing_given_up() -> None:
    """A router of a new release may read the catalog before the controller migrated it."""
    old = _row()
    del old["next_attempt_at"], old["gave_up"]
    job = Job.from_row(old)
    assert (job.next_attempt_at, job.gave_up) == (None, False)
