"""The API's middlewares: the bearer token, and every failure as ``{"error", "hint"}``."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from jobmesh import jobids

from ..catalog.models import CatalogError, Conflict, NotFound
from .request import ApiError, error_response

log = logging.getLogger("jobmesh.controller.api")

PUBLIC = frozenset({"/v1/healthz", "/v1/openapi.json"})

# What a user can do about a catalog refusal, by the kind of thing the request is about.
HINTS = {
    ("jobs", NotFound): "`jobmesh job list` (GET /v1/jobs) shows the jobs there are",
    ("jobs", Conflict): "pick another id, or delete the job first (its id is free again once "
                        "the deletion has finished)",
    ("jobs", CatalogError): jobids.RULE,  # the message says what is wrong with this id
    ("users", NotFound): "`jobmesh user list` (GET /v1/users) shows the users there are",
    ("users", Conflict): "pick another name, or delete the user first",
    ("users", CatalogError): "user names are 1-63 characters: letters, digits, '_', '.', "
                             "'@' and '-'",
    ("grants", NotFound): "`jobmesh user list` shows users and their grants",
    ("grants", Conflict): "`jobmesh user list` shows users and their grants",
    ("grants", CatalogError): "a pattern is a job id or a glob such as 'scrape-*' or '*'; "
                              "access is read or write",
}


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request],
                 Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure as ``{"error", "hint"}``: ours, the catalog's, and aiohttp's own."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.error, exc.hint, exc.headers)
    except CatalogError as exc:
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
        resource = request.path.split("/")[2] if request.path.count("/") >= 2 else ""
        kind = type(exc) if type(exc) in (NotFound, Conflict) else CatalogError
        hint = HINTS.get((resource, kind), "see GET /v1/openapi.json")
        return error_response(status, str(exc), hint)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error, hint = {
            404: (f"no endpoint {request.path}", "GET /v1/openapi.json lists the endpoints"),
            405: (f"{request.method} is not allowed on {request.path}",
                  f"allowed here: {exc.headers.get('Allow', '')}"),
            413: ("the request body is too large", "JSON bodies are at most 1 MiB"),
        }.get(exc.status, (exc.reason.lower(), "see GET /v1/openapi.json"))
        return error_response(exc.status, error, hint, {
            k: v for k, v in exc.headers.items() if k == "Allow"})
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.error("%s %s failed: %s", request.method, request.path, exc)
        return error_response(503, f"the controller cannot do this now: {exc}",
                              "the catalog or the disk is failing; retry, and see the "
                              "controller's log")
    except Exception as exc:  # a bug: still an answer the client can show, details in the log
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                              "this is a bug; the controller's log has the details")


def auth(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request],
                    Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # Routes outside /v1 (the controller's /metrics) are not the API's to guard.
        if request.path.startswith("/v1/") and request.path not in PUBLIC:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(), expected):
                raise ApiError(401, "missing or wrong API token",
                               "send `Authorization: Bearer <token>`; `jobmesh up` keeps the "
                               "token in <state-dir>/api-token",
                               {"WWW-Authenticate": 'Bearer realm="jobmesh"'})
        return await handler(request)
    return check
