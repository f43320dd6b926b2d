"""The in-place recovery's bookkeeping: the crash-loop limit and the failed copies' budget."""

from __future__ import annotations

from pathlib import Path

from jobmesh.controller.backends.local.in_place import CrashLoop, FailedCopies, whole
from jobmesh.controller.backends.local.process import JobDir


def test_a_job_crashing_again_and_again_goes_to_the_store_after_the_limit() -> None:
    loop = CrashLoop(limit=2, window=600)
    assert loop.allow("a") and loop.allow("a")
    assert not loop.allow("a")
    assert loop.allow("b")  # per job
    loop.forget("a")
    assert loop.allow("a")


def test_crashes_older_than_the_window_do_not_count() -> None:
    loop = CrashLoop(limit=1, window=0)
    assert loop.allow("a") and loop.allow("a")


def _job_dir(root: Path, job_id: str, size: int) -> JobDir:
    jd = JobDir(root, job_id)
    (jd.pgdata / "global").mkdir(parents=True)
    (jd.pgdata / "PG_VERSION").write_text("15\n")
    (jd.pgdata / "global" / "pg_control").write_bytes(b"\0" * size)
    jd.postgres_log.write_text("PANIC: could not locate a valid checkpoint record\n")
    return jd


def test_only_a_marked_pgdata_is_whole(tmp_path: Path) -> None:
    jd = _job_dir(tmp_path, "a", 10)
    assert not whole(jd)
    jd.ready.write_text("{}")
    assert whole(jd)
    (jd.pgdata / "global" / "pg_control").unlink()
    assert not whole(jd)


def test_failed_copies_stay_within_their_budget_oldest_going_first(tmp_path: Path) -> None:
    copies = FailedCopies(tmp_path / "failed", budget=2500)
    first = copies.keep(_job_dir(tmp_path, "a", 1000))
    assert first is not None and (first / "pgdata" / "PG_VERSION").is_file()
    assert "could not locate" in (first / "postgres.log").read_text()
    second = copies.keep(_job_dir(tmp_path, "b", 1000))
    assert copies.copies() == [first, second]
    third = copies.keep(_job_dir(tmp_path, "c", 1000))
    assert copies.copies() == [second, third]  # the oldest made room
    assert copies.keep(_job_dir(tmp_path, "d", 5000)) is None  # alone over the budget
    assert copies.copies() == [second, third]  # and the others stay
    assert not (tmp_path / "jobs" / "d" / "pgdata").exists()


def test_nothing_to_keep_without_a_pgdata(tmp_path: Path) -> None:
    assert FailedCopies(tmp_path / "failed").keep(JobDir(tmp_path, "none")) is None
