"""The sidecar's HTTP API: health and status, Prometheus metrics, and the operations.

``GET /healthz`` (503 unless Postgres accepts connections), ``GET /status``,
``GET /metrics``; ``POST /pause``, ``POST /base-backup`` and ``POST /dump``
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


def routes(prefix: str, find: Callable[[web.Request], Agent]) -> list[web.RouteDef]:
    """The API under ``prefix``, for the agent ``find`` names for a request (it raises
    ``web.HTTPNotFound`` for one it does not know): one agent's at ``""``, each of the
    local agent host's at ``/jobs/{job}``."""
    async def healthz(req: web.Request) -> web.Response:
        ok, body = await find(req).health()
        return _json(body, 200 if ok else 503)

    async def status(req: web.Request) -> web.Response:
        return _json(await find(req).status())

    async def metrics(req: web.Request) -> web.Response:
        agent = find(req)
        agent.metrics.archive_lag.set(await asyncio.to_thread(agent.archiver.lag))
        return web.Response(body=generate_latest(agent.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def pause(req: web.Request) -> web.Response:
        return await _operation("pause", find(req).pause)

    async def base_backup(req: web.Request) -> web.Response:
        return await _operation("base backup", find(req).base_backup)

    async def dump(req: web.Request) -> web.Response:
        agent = find(req)
        return await _operation("dump", lambda: agent.dump(req.query.get("database")))

    return [web.get(f"{prefix}/healthz", healthz), web.get(f"{prefix}/status", status),
            web.get(f"{prefix}/metrics", metrics), web.post(f"{prefix}/pause", pause),
            web.post(f"{prefix}/base-backup", base_backup), web.post(f"{prefix}/dump", dump)]


def build_app(agent: Agent) -> web.Application:
    app = web.Application()
    app.add_routes(routes("", lambda _req: agent))
    return app
