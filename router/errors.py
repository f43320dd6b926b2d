"""Errors the router reports to clients, each with a SQLSTATE and a hint."""

from __future__ import annotations

from jobmesh import jobids

from . import protocol as pg


class ClientError(Exception):
    """Ends a client connection with a FATAL ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint

    def to_bytes(self) -> bytes:
        return pg.error_response(self.sqlstate, self.message, self.hint)


def invalid_database(database: str) -> ClientError:
    return ClientError(
        "3D000",
        f'database "{database}" does not exist',
        "Connect with dbname=job_<id>, where <id> is a job's id.",
    )


def bad_job_id(database: str, job_id: str) -> ClientError:
    return ClientError(
        "3D000",
        f'database "{database}" does not exist: {jobids.why_not(job_id)}',
        f"Connect with dbname=job_<id>; {jobids.RULE}.",
    )


def unknown_job(job_id: str) -> ClientError:
    return ClientError(
        "3D000",
        f'job "{job_id}" does not exist',
        "Check the job id in dbname=job_<id>.",
    )


def bad_password(user: str) -> ClientError:
    return ClientError(
        "28P01",
        f'password authentication failed for user "{user}"',
        "Check the user name and password.",
    )


def not_granted(user: str, job_id: str) -> ClientError:
    return ClientError(
        "42501",
        f'permission denied: user "{user}" has no grant on job "{job_id}"',
        f"Ask an operator to grant {user} access to {job_id}.",
    )


def not_console_user(user: str) -> ClientError:
    return ClientError(
        "42501",
        f'permission denied: user "{user}" may not use the admin console',
        "The console is for admin principals, and stats principals (SHOW only).",
    )


def too_many(what: str, hint: str) -> ClientError:
    return ClientError("53300", f"sorry, too many clients already ({what})", hint)


def unreachable(job_id: str, detail: str) -> ClientError:
    return ClientError(
        "57P03",
        f'job "{job_id}" is not reachable: {detail}',
        "The job's database is not accepting connections; try again shortly.",
    )


class NotAnswering(Exception):
    """The job's PostgreSQL is not there right now (connection refused or reset, or it
    answered 57P03: starting up, in crash recovery, shutting down): a client may be held
    until it is back. ``error`` is what the client gets if it is not."""

    def __init__(self, error: ClientError, detail: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.detail = detail


def not_back(job_id: str, seconds: float, detail: str) -> ClientError:
    return ClientError(
        "57P03",
        f'job "{job_id}" is not reachable: {detail}, and it was not back within {seconds:g} s',
        "The controller restarts a job whose PostgreSQL died; see `jobmesh job show` for "
        "why it is not back yet.",
    )


def shutting_down() -> ClientError:
    return ClientError(
        "57P01",
        "the router is shutting down",
        "Reconnect; another router instance or the restarted router will serve you.",
    )


def protocol_violation(detail: str) -> ClientError:
    return ClientError("08P01", f"protocol violation: {detail}", "The client sent invalid bytes.")


def tls_required() -> ClientError:
    return ClientError(
        "28000",
        "this router accepts only TLS connections",
        "Connect with sslmode=require (or verify-full).",
    )


def catalog_unavailable() -> ClientError:
    return ClientError(
        "57P03",
        "the router cannot reach the jobmesh catalog",
        "Jobs, users and grants are unavailable for the moment; try again shortly.",
    )


def job_ended(job_id: str, desired: str) -> ClientError:
    if desired == "deleted":
        return ClientError(
            "57P03", f'job "{job_id}" is being deleted', "A deleted job cannot be woken."
        )
    return ClientError(
        "57P03",
        f'job "{job_id}" is ended',
        f"Connecting does not wake an ended job; resume it with: jobmesh job resume {job_id}",
    )


def wake_failed(job_id: str, error: str, attempts: int) -> ClientError:
    return ClientError(
        "57P03",
        f'job "{job_id}" failed to start: {error}',
        f"The controller's last {attempts} attempts failed; it keeps retrying. "
        "Check the job's events, or reconnect later.",
    )


def wake_gave_up(job_id: str, error: str) -> ClientError:
    return ClientError(
        "57P03",
        f'job "{job_id}" failed to start: {error}',
        "The controller will not retry it: fix the cause, then run "
        f"jobmesh job retry {job_id} (or jobmesh job delete {job_id}).",
    )


def wake_timeout(job_id: str, seconds: float, progress: str | None) -> ClientError:
    doing = f" (last step: {progress})" if progress else ""
    return ClientError(
        "57P03",
        f'job "{job_id}" did not start within {seconds:g}s{doing}',
        "The job is still starting; reconnect in a moment. "
        "If it never starts, check the controller and the job's events.",
    )
