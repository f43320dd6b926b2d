"""The sidecar's HTTP API: health and status, Prometheus metrics, and the operations.

``GET /healthz`` (503 unless Postgres accepts connections), ``GET /status``,
``GET /metrics``; ``POST /pause``, ``POST /base-backup`` and ``POST /dump``
(all but /healthz and /metrics with the agent's bearer token: ``apitoken.py``)
answer the stored manifest as JSON (``Manifest.to_json``; a client reads it
back with ``Manifest.from_json``), 409 when the agent's state forbids the
operation and 500 with ``{"error": ...}`` when it fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jobmesh.errors import one_line

from ..apitoken import authorized
from ..errors import AgentError
from ..manifest import Manifest, ManifestError
from ..postgres import PostgresError
from ..store import StoreError
from .daemon import Agent, Conflict

log = logging.getLogger("jobmesh.agent.serve")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body, indent=2) + "\n",
                        content_type="application/json")


def _manifest_response(m: Manifest) -> web.Response:
    return web.Response(body=m.to_json(), content_type="application/json")


async def _operation(what: str, op: Callable[[], Awaitable[Manifest]]) -> web.Response:
    try:
        return _manifest_response(await op())
    except Conflict as exc:
        return _json({"error": one_line(exc)}, 409)
    except (AgentError, StoreError, PostgresError, ManifestError) as exc:
        log.error("%s failed: %s", what, one_line(exc))
        return _json({"error": one_line(exc)}, 500)
    except Exception as exc:
        log.exception("%s failed", what)
        return _json({"error": one_line(exc)}, 500)


def refused(req: web.Request) -> web.Response:
    """401 for a request without the right token; the source is logged."""
    log.warning("refused %s %s from %s: missing or wrong agent token", req.method,
                req.path, req.remote)
    return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="jobmesh-agent"'},
                        content_type="application/json", text=json.dumps({
                            "error": "missing or wrong agent token",
                            "hint": "the controller sends each job's own token; see the "
                                    "README's security section"}) + "\n")


def allowed(req: web.Request, token: str | None) -> bool:
    return token is None or authorized(req.headers.get("Authorization"), token)


def routes(prefix: str, find: Callable[[web.Request], Agent]) -> list[web.RouteDef]:
    """The API under ``prefix``, for the agent ``find`` names for a request (it raises
    ``web.HTTPNotFound`` for one it does not know): one agent's at ``""``, each of the
    local agent host's at ``/jobs/{job}``. Every endpoint but /healthz and /metrics wants
    the agent's own token (``apitoken.py``)."""
    def guarded(handler: Callable[[web.Request, Agent], Awaitable[web.Response]]
                ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def check(req: web.Request) -> web.Response:
            agent = find(req)
            if not allowed(req, agent.config.api_token):
                return refused(req)
            return await handler(req, agent)
        return check

    async def healthz(req: web.Request) -> web.Response:
        ok, body = await find(req).health()
        return _json(body, 200 if ok else 503)

    @guarded
    async def status(_req: web.Request, agent: Agent) -> web.Response:
        return _json(await agent.status())

    async def metrics(req: web.Request) -> web.Response:
        agent = find(req)
        agent.metrics.archive_lag.set(await asyncio.to_thread(agent.archiver.lag))
        return web.Response(body=generate_latest(agent.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    @guarded
    async def pause(_req: web.Request, agent: Agent) -> web.Response:
        return await _operation("pause", agent.pause)

    @guarded
    async def base_backup(_req: web.Request, agent: Agent) -> web.Response:
        return await _operation("base backup", agent.base_backup)

    @guarded
    async def dump(req: web.Request, agent: Agent) -> web.Response:
        return await _operation("dump", lambda: agent.dump(req.query.get("database")))

    return [web.get(f"{prefix}/healthz", healthz), web.get(f"{prefix}/status", status),
            web.get(f"{prefix}/metrics", metrics), web.post(f"{prefix}/pause", pause),
            web.post(f"{prefix}/base-backup", base_backup), web.post(f"{prefix}/dump", dump)]


def build_app(agent: Agent) -> web.Application:
    app = web.Application()
    app.add_routes(routes("", lambda _req: agent))
    return app
