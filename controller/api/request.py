"""What an API request says, checked, and how the API answers: JSON bodies and errors.

Errors are values: ``ApiError(status, error, hint)`` becomes
``{"error": ..., "hint": ...}`` with that status, so a client (the CLI) can
show one line the user can act on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..catalog.models import check_job_id
from ..catalog.passwords import scram_verifier

WAIT_DEFAULT = 300.0
WAIT_MAX = 3600.0
QUANTITY = r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?"
LIMITS = ("memory", "cpu", "disk")  # the spec fields a backend may enforce, or may not


class ApiError(Exception):
    def __init__(self, status: int, error: str, hint: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.hint, self.headers = status, error, hint, headers or {}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, indent=2) + "\n",
                        content_type="application/json", headers=headers)


def error_response(status: int, error: str, hint: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": error, "hint": hint}, status, headers)


# --- request parsing --------------------------------------------------------------------


async def json_object(request: web.Request, example: str) -> dict[str, Any]:
    try:
        body = json.loads(await request.text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}",
                       f"send a JSON object such as {example}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object",
                       f"send a JSON object such as {example}")
    return body


def fields(body: dict[str, Any], example: str, required: tuple[str, ...],
           optional: tuple[str, ...] = ()) -> None:
    """Refuse missing, unknown and non-string fields (optional ones are checked by the caller)."""
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}",
                       f"the fields are {', '.join(required + optional)}, as in {example}")
    for name in required:
        if not isinstance(body.get(name), str) or not body[name]:
            raise ApiError(400, f"{name!r} must be a non-empty string", f"for example {example}")


# What ``PATCH /v1/jobs/{id}`` may change: the router's settings, read at each connect.
UPDATABLE = ("pool_mode", "pool_size", "max_connections")


def spec_update(raw: Any) -> dict[str, Any]:
    """The fields of a spec update, checked; the others are fixed when a job is created."""
    spec = job_spec(raw)
    fixed = sorted(set(spec) - set(UPDATABLE))
    if fixed:
        raise ApiError(400, f"{fixed[0]} cannot be changed after the job is created",
                       f"a spec update may set {', '.join(UPDATABLE)}; fork the job for "
                       "other settings")
    if not spec:
        raise ApiError(400, "nothing to update",
                       'for example {"spec": {"pool_mode": "transaction", "pool_size": 10}}')
    return spec


def job_spec(raw: Any) -> dict[str, Any]:
    """A job's resources, archive_timeout and wal_window, checked (the backends trust them)."""
    example = '{"archive_timeout": 60, "cpu": "500m", "memory": "1Gi", "disk": "10Gi"}'
    if not isinstance(raw, dict):
        raise ApiError(400, "'spec' must be a JSON object", f"for example {example}")
    spec: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "archive_timeout":
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    0 <= value <= 1_073_741_823):
                raise ApiError(400, "archive_timeout must be a whole number of seconds >= 0",
                               "0 turns the forced WAL switch off; 60 bounds the data at risk "
                               "to a minute")
            spec[key] = value
        elif key == "wal_window":
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 <= value <= 86400):
                raise ApiError(400, "wal_window must be a number of seconds from 0 to 86400",
                               "what a lost machine may lose: 5 by default; 0 streams no WAL "
                               "(only finished segments are stored)")
            spec[key] = value
        elif key == "keep_pauses":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise ApiError(400, "keep_pauses must be a whole number from 1 to 1000",
                               "how many pause snapshots the job keeps (default 3)")
            spec[key] = value
        elif key == "pitr_window":
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    0 <= value <= 90 * 86400):
                raise ApiError(400, "pitr_window must be a number of seconds from 0 to 7776000",
                               "how far back a point-in-time restore or fork can aim "
                               "(default 86400: a day)")
            spec[key] = value
        elif key == "pool_mode":
            if value not in ("session", "transaction"):
                raise ApiError(400, 'pool_mode must be "session" or "transaction"',
                               "transaction: clients share pool_size server connections, one "
                               "per transaction (session state does not carry over)")
            spec[key] = value
        elif key == "max_connections":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
                raise ApiError(400, "max_connections must be a whole number from 1 to 100000",
                               "client connections to the job through all the routers "
                               "together (unset: no limit)")
            spec[key] = value
        elif key == "pool_size":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
                raise ApiError(400, "pool_size must be a whole number from 1 to 10000",
                               "server connections per router process (default: the "
                               "router's --pool-size, 20)")
            spec[key] = value
        elif key in ("cpu", "memory", "disk"):
            text = str(value) if isinstance(value, int | float) and not isinstance(
                value, bool) else value
            if not isinstance(text, str) or not re.fullmatch(QUANTITY, text):
                raise ApiError(400, f"{key} must be a Kubernetes quantity, got {value!r}",
                               "for example cpu \"500m\" or 2, memory \"1Gi\", disk \"10Gi\"")
            spec[key] = text
        elif key == "source":
            raise ApiError(400, "a job's source cannot be set here",
                           "to create a job from a dump, POST it to /v1/jobs/{id}/import "
                           "(`jobmesh job import ID FILE`)")
        else:
            raise ApiError(400, f"unknown spec field {key!r}",
                           f"the spec fields are archive_timeout, wal_window, keep_pauses, "
                           f"pitr_window, pool_mode, pool_size, max_connections, cpu, memory and "
                           f"disk, as in "
                           f"{example}")
    return spec


@dataclass(frozen=True)
class LimitWarning:
    """A job's spec asks for limits its backend does not enforce: the job runs without them.

    The local backend runs jobs as plain processes; saying nothing would let a user
    believe ``--memory 1Gi`` protects the machine."""

    backend: str
    fields: tuple[str, ...]  # in the order of LIMITS

    @classmethod
    def of(cls, spec: dict[str, Any], backend: str,
           enforced: frozenset[str]) -> LimitWarning | None:
        ignored = tuple(k for k in LIMITS if k in spec and k not in enforced)
        return cls(backend, ignored) if ignored else None

    def public(self) -> dict[str, Any]:
        names = " and ".join(self.fields) if len(self.fields) < 3 else \
            f"{', '.join(self.fields[:-1])} and {self.fields[-1]}"
        those = "that limit" if len(self.fields) == 1 else "those limits"
        return {"kind": "unenforced_limits", "backend": self.backend,
                "fields": list(self.fields),
                "message": f"the {self.backend} backend does not enforce {names}: the job "
                           f"runs without {those}"}


def verifier_of(password: Any) -> str:
    """The SCRAM verifier the catalog keeps instead of a password (never the password)."""
    try:
        return scram_verifier(password)
    except ValueError as exc:  # SASLprep refuses control characters and the like
        raise ApiError(400, f"unusable password: {exc}", "use printable characters") from None


def wait_params(request: web.Request) -> float | None:
    """``?wait=1[&timeout=S]``: how long to wait for the job to settle (None: do not wait)."""
    raw = request.query.get("wait", "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ApiError(400, f"wait must be 1 or 0, got {raw!r}",
                       "?wait=1 returns once the job reached the wanted state")
    if raw in ("0", "false", "no", ""):
        return None
    return timeout_param(request)


def timeout_param(request: web.Request) -> float:
    """``?timeout=S``: how long a wait may take before the answer is a 504."""
    try:
        timeout = float(request.query.get("timeout", WAIT_DEFAULT))
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= WAIT_MAX:
        raise ApiError(400, "timeout must be a number of seconds in (0, 3600]",
                       f"the default is {WAIT_DEFAULT:g} s")
    return timeout


def path_job_id(request: web.Request) -> str:
    job_id = request.match_info["id"]
    check_job_id(job_id)
    return job_id
