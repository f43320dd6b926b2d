"""Which failures the reconciler gives up on: a PermanentError, or one raised from one."""

from __future__ import annotations

from jobmesh.controller.backends.job_spec import BadSpec, archive_timeout
from jobmesh.controller.core.backend import BackendError, PermanentError
from jobmesh.controller.core.reconciler import permanent


def _raised_from(cause: BaseException, error: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise error from exc
    except BaseException as exc:
        return exc


def test_a_permanent_error_is_permanent_and_a_backend_error_is_not() -> None:
    assert permanent(PermanentError("the dump does not load"))
    assert not permanent(BackendError("the agent did not answer"))
    assert not permanent(OSError("disk full"))


def test_an_error_raised_from_a_permanent_one_stays_permanent() -> None:
    wrapped = _raised_from(PermanentError("no snapshot"), BackendError("cannot resume job a"))
    assert permanent(wrapped)
    twice = _raised_from(wrapped, BackendError("cannot do it"))
    assert permanent(twice)


def test_an_error_raised_while_handling_a_permanent_one_is_not() -> None:
    try:
        try:
            raise PermanentError("no snapshot")
        except PermanentError:
            raise OSError("the cleanup failed")  # noqa: B904 (the point: no "from")
    except OSError as exc:
        assert exc.__context__ is not None
        assert not permanent(exc)


def test_a_cycle_of_causes_ends() -> None:
    a, b = BackendError("a"), BackendError("b")
    a.__cause__, b.__cause__ = b, a
    assert not permanent(a)


def test_a_bad_spec_is_permanent_and_still_a_value_error() -> None:
    try:
        archive_timeout({"archive_timeout": -1}, 60)
    except ValueError as exc:
        assert isinstance(exc, BadSpec) and permanent(exc)
        # As a backend wraps it:
        assert permanent(_raised_from(exc, BackendError(f"job a: {exc}")))
    else:
        raise AssertionError("a negative archive_timeout was accepted")
    assert archive_timeout({}, 60) == 60 and archive_timeout({"archive_timeout": 0}, 60) == 0
