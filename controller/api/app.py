"""The controller's HTTP API (aiohttp): jobs, export and import, users, grants, status.

Every change is a row in the catalog; the reconciler does the work. Requests
that should return once the work is done (``?wait=1``: ``jobmesh job pause X``
returns when X is paused) LISTEN on the catalog's jobs channel and re-read the
job on each announcement, with a slow re-read as backstop for a lost one.

Every endpoint under ``/v1`` needs the bearer token except ``/v1/healthz`` and
``/v1/openapi.json``. Errors are ``{"error": ..., "hint": ...}`` with a 4xx
status the client can act on; the document in ``openapi.py`` describes it all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from jobmesh.agent.store import Store

from ..catalog.db import Catalog
from ..catalog.models import (
    Conflict,
    Job,
    NotFound,
    PrincipalRow,
    check_pattern,
    check_principal,
)
from ..catalog.states import DesiredState, settled
from ..mesh import ADMIN_PASSWORD_FILE, AGENT_KEY_FILE, announced_router, ensure_secret
from ..storage.keeper import Keeper
from ..web.guard import WebConfig
from ..web.pages import mount
from . import openapi
from .middleware import auth, errors
from .request import (
    ApiError,
    LimitWarning,
    fields,
    job_spec,
    json_object,
    json_response,
    path_job_id,
    spec_update,
    verifier_of,
    wait_params,
)
from .rewind import check_target, rewind
from .storage import store_routes
from .transfer import API_ACTOR, export_job, import_job
from .wait import JobWatch


def user_public(p: PrincipalRow) -> dict[str, Any]:
    return {"name": p.name, "admin": p.admin, "stats": p.stats,
            "grants": [{"pattern": g.pattern, "access": g.access} for g in p.grants]}


# --- the application --------------------------------------------------------------------


class Api:
    """The handlers, and what they share: the catalog, the store, the waiters."""

    def __init__(self, catalog: Catalog, store: Store | None,
                 agent_http: aiohttp.ClientSession | None, state_dir: Path | None,
                 router: tuple[str, int] | None, backend: str,
                 enforced_limits: frozenset[str], agent_key: bytes) -> None:
        self.catalog = catalog
        self.store = store
        self.agent_http = agent_http
        self.state_dir = state_dir
        self.router = router
        self.backend = backend
        self.enforced_limits = enforced_limits
        self.agent_key = agent_key  # the jobs' agent tokens derive from it
        self.watch = JobWatch(catalog)
        self.importing: set[str] = set()  # one import per job id at a time

    async def settle(self, job_id: str, target: DesiredState,
                     timeout: float | None) -> Job | None:
        """The job once it is what ``target`` asks (None: its row is gone), within ``timeout``."""
        if timeout is None:
            return await self.catalog.job(job_id)
        return await self.watch.wait(job_id, target, timeout)

    async def audit(self, req: web.Request, job_id: str | None, kind: str,
                    **detail: Any) -> None:
        """An operator's action through the API, as an event: who, when, what."""
        await self.catalog.add_event(job_id, kind, actor=API_ACTOR,
                                     detail={**detail, "source": req.remote or "unknown"})

    async def job_or_404(self, job_id: str) -> Job:
        job = await self.catalog.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def warnings(self, job: Job) -> list[dict[str, Any]]:
        """What the job's spec asks for that it will not get (limits the backend ignores)."""
        w = LimitWarning.of(job.spec, self.backend, self.enforced_limits)
        return [w.public()] if w is not None else []

    # -- jobs ------------------------------------------------------------------------

    async def list_jobs(self, _req: web.Request) -> web.Response:
        return json_response({"jobs": [j.public() for j in await self.catalog.jobs()]})

    async def create_job(self, req: web.Request) -> web.Response:
        timeout = wait_params(req)
        example = '{"id": "scrape-42", "spec": {"archive_timeout": 60}}'
        body = await json_object(req, example)
        fields(body, example, ("id",), ("spec",))
        job = await self.catalog.create_job(body["id"], job_spec(body.get("spec", {})),
                                            actor=API_ACTOR)
        job = await self.settle(job.id, DesiredState.RUNNING, timeout) or job
        return json_response({**job.public(), "warnings": self.warnings(job)}, 201,
                             {"Location": f"/v1/jobs/{job.id}"})

    async def update_job(self, req: web.Request) -> web.Response:
        """Change a job's router settings (pool_mode, pool_size): new connections use them."""
        job_id = path_job_id(req)
        example = '{"spec": {"pool_mode": "transaction", "pool_size": 10}}'
        body = await json_object(req, example)
        fields(body, example, (), ("spec",))
        changes = spec_update(body.get("spec", {}))
        await self.job_or_404(job_id)
        job = await self.catalog.update_spec(job_id, changes)
        return json_response(job.public())

    def local_only(self, what: str) -> None:
        if self.backend != "local":
            raise ApiError(409, f"{what} is not supported on the {self.backend} backend yet",
                           "the local backend does it; on Kubernetes, restore a snapshot "
                           "with `jobmesh agent restore --job SRC --target-time T` into a "
                           "new job's volume")

    async def fork_job(self, req: web.Request) -> web.Response:
        """A new job from another's data (its latest state, or as it was at ``at``), sharing
        its objects in the store; the source is only read."""
        source, timeout = path_job_id(req), wait_params(req)
        self.local_only("fork")
        example = '{"id": "scrape-42-copy", "at": "2026-12-01T10:00:00Z"}'
        body = await json_object(req, example)
        fields(body, example, ("id",), ("at",))
        src = await self.job_or_404(source)
        at = body.get("at")
        if at is not None and self.store is not None:
            at = (await check_target(self.store, src, at)).isoformat()
        spec = {k: v for k, v in src.spec.items() if k not in ("source", "rewind")}
        spec["source"] = {"fork": src.id, **({"at": at} if at else {})}
        job = await self.catalog.create_job(body["id"], spec, actor=API_ACTOR)
        job = await self.settle(job.id, DesiredState.RUNNING, timeout) or job
        return json_response({**job.public(), "warnings": self.warnings(job)}, 201,
                             {"Location": f"/v1/jobs/{job.id}"})

    async def restore_job(self, req: web.Request) -> web.Response:
        """Rewind the job to a time in its point-in-time window (``rewind.py``)."""
        if self.store is None:
            raise ApiError(503, "this controller has no store to restore from",
                           "start the controller with --store")
        self.local_only("restore --at")
        job = await self.job_or_404(path_job_id(req))
        job = await rewind(req, job, catalog=self.catalog, store=self.store,
                           settle=self.settle, timeout=wait_params(req))
        return json_response(job.public())

    async def show_job(self, req: web.Request) -> web.Response:
        job = await self.job_or_404(path_job_id(req))
        events = await self.catalog.events(job.id, limit=20)
        return json_response({**job.public(), "warnings": self.warnings(job),
                              "snapshots": await self.catalog.snapshots(job.id),
                              "events": [e.public() for e in events]})

    async def set_desired(self, job_id: str, desired: DesiredState) -> Job:
        try:
            return await self.catalog.set_desired(job_id, desired, actor=API_ACTOR)
        except Conflict as exc:  # the one refusal: a job being deleted
            raise ApiError(409, str(exc), "a job being deleted can only be deleted; its id is "
                                          "free again once that has finished") from None

    def desire(self, desired: DesiredState) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(req: web.Request) -> web.Response:
            job_id, timeout = path_job_id(req), wait_params(req)
            job = await self.set_desired(job_id, desired)
            job = await self.settle(job_id, desired, timeout) or job
            return json_response(job.public())
        return handler

    async def retry_job(self, req: web.Request) -> web.Response:
        """Try again now what the controller gave up on (or is waiting to retry)."""
        job_id, timeout = path_job_id(req), wait_params(req)
        job = await self.catalog.retry(job_id)
        if job.desired_state == DesiredState.DELETED:
            return json_response(job.public())  # the deletion goes on; it never gave up
        job = await self.settle(job_id, job.desired_state, timeout) or job
        return json_response(job.public())

    async def delete_job(self, req: web.Request) -> web.Response:
        job_id, timeout = path_job_id(req), wait_params(req)
        job = await self.set_desired(job_id, DesiredState.DELETED)
        if timeout is None:
            return json_response(job.public(), 202)
        await self.settle(job_id, DesiredState.DELETED, timeout)
        return web.Response(status=204)

    async def mesh_events(self, req: web.Request) -> web.Response:
        """Every event (the mesh's own, a login say, and every job's), or ``?job=ID``'s."""
        job_id = req.query.get("job")
        if job_id is not None:
            await self.job_or_404(job_id)
        return await self._events(req, job_id)

    async def job_events(self, req: web.Request) -> web.Response:
        job_id = path_job_id(req)
        await self.job_or_404(job_id)
        return await self._events(req, job_id)

    async def _events(self, req: web.Request, job_id: str | None) -> web.Response:
        try:
            limit = int(req.query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 10_000:
            raise ApiError(400, "limit must be a whole number from 1 to 10000",
                           "the newest events are returned, oldest first")
        events = await self.catalog.events(job_id, kind=req.query.get("kind"), limit=limit)
        return json_response({"events": [e.public() for e in events]})

    async def export(self, req: web.Request) -> web.StreamResponse:
        if self.store is None or self.agent_http is None:
            raise ApiError(503, "this controller has no store to export through",
                           "start the controller with --store")
        job = await self.job_or_404(path_job_id(req))
        return await export_job(req, job, catalog=self.catalog, store=self.store,
                                http=self.agent_http, watch=self.watch,
                                agent_key=self.agent_key)

    async def import_(self, req: web.Request) -> web.Response:
        job_id, timeout = path_job_id(req), wait_params(req)
        if self.state_dir is None:
            raise ApiError(503, "this controller has no state directory to keep imports in",
                           "start the controller with --state-dir")
        job = await import_job(req, job_id, catalog=self.catalog, state_dir=self.state_dir,
                               importing=self.importing)
        job = await self.settle(job_id, DesiredState.RUNNING, timeout) or job
        return json_response(job.public(), 201, {"Location": f"/v1/jobs/{job_id}"})

    # -- users and grants -------------------------------------------------------------

    async def list_users(self, _req: web.Request) -> web.Response:
        return json_response({"users": [user_public(p) for p in
                                        await self.catalog.principals()]})

    async def create_user(self, req: web.Request) -> web.Response:
        example = '{"name": "analyst", "password": "..."}'
        body = await json_object(req, example)
        fields(body, example, ("name", "password"), ("stats",))
        check_principal(body["name"])
        stats = body.get("stats", False)
        if not isinstance(stats, bool):
            raise ApiError(400, "'stats' must be true or false",
                           "true: a stats principal, which may only run the router's admin "
                           "console SHOW commands (an exporter's login)")
        await self.catalog.create_principal(body["name"], verifier_of(body["password"]),
                                            stats=stats)
        await self.audit(req, None, "user-created", user=body["name"], stats=stats)
        return json_response({"name": body["name"], "admin": False, "stats": stats,
                              "grants": []}, 201, {"Location": f"/v1/users/{body['name']}"})

    async def set_password(self, req: web.Request) -> web.Response:
        """A new password for a user who lost theirs (kept, like the first, as a verifier)."""
        name = req.match_info["name"]
        check_principal(name)
        example = '{"password": "..."}'
        body = await json_object(req, example)
        fields(body, example, ("password",))
        found = await self.catalog.principals(name)
        if not found:
            raise NotFound(f"no user {name}")
        if found[0].admin:  # `jobmesh up` owns it: a verifier set here would not last
            where = (self.state_dir / ADMIN_PASSWORD_FILE if self.state_dir
                     else f"<state-dir>/{ADMIN_PASSWORD_FILE}")
            raise ApiError(409, f"user {name} is the mesh's administrator: its password is "
                                f"the file {where}",
                           "to get a new one, stop `jobmesh up`, remove that file and start "
                           "`jobmesh up` again: it makes a new password and shows it once")
        await self.catalog.set_verifier(name, verifier_of(body["password"]))
        await self.audit(req, None, "password-set", user=name)
        return web.Response(status=204)

    async def delete_user(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        check_principal(name)
        found = await self.catalog.principals(name)
        if found and found[0].admin:
            raise ApiError(409, f"user {name} is the mesh's administrator",
                           "the admin is how `jobmesh psql` reaches the jobs; it stays")
        await self.catalog.delete_principal(name)
        await self.audit(req, None, "user-deleted", user=name)
        return web.Response(status=204)

    async def grant(self, req: web.Request) -> web.Response:
        example = '{"user": "analyst", "pattern": "scrape-*", "access": "read"}'
        body = await json_object(req, example)
        fields(body, example, ("user", "pattern", "access"))
        check_principal(body["user"])
        check_pattern(body["pattern"])
        await self.catalog.grant(body["user"], body["pattern"], body["access"])
        await self.audit(req, None, "granted", user=body["user"], pattern=body["pattern"],
                         access=body["access"])
        return json_response({k: body[k] for k in ("user", "pattern", "access")})

    async def revoke(self, req: web.Request) -> web.Response:
        example = '{"user": "analyst", "pattern": "scrape-*"}'
        body = await json_object(req, example)
        fields(body, example, ("user", "pattern"))
        check_principal(body["user"])
        await self.catalog.revoke(body["user"], body["pattern"])
        await self.audit(req, None, "revoked", user=body["user"], pattern=body["pattern"])
        return web.Response(status=204)

    # -- the mesh ---------------------------------------------------------------------

    async def status(self, _req: web.Request) -> web.Response:
        jobs = await self.catalog.jobs()
        by_state = Counter(j.state for j in jobs)
        moving = [{"id": j.id, "state": j.state, "desired_state": j.desired_state,
                   "progress": j.progress, "error": j.error, "gave_up": j.gave_up}
                  for j in jobs if j.state != settled(j.desired_state)]
        users = await self.catalog.pool.fetchval("SELECT count(*) FROM principals")
        return json_response({
            "jobs": {"total": len(jobs), "by_state": dict(sorted(by_state.items())),
                     "unsettled": moving},
            "users": users, "router": self.router_address()})

    def router_address(self) -> dict[str, Any] | None:
        router = self.router or (announced_router(self.state_dir) if self.state_dir else None)
        return {"host": router[0], "port": router[1]} if router else None

    async def healthz(self, _req: web.Request) -> web.Response:
        try:
            await self.catalog.pool.fetchval("SELECT 1", timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            return json_response({"status": "unavailable", "catalog": str(exc)}, 503)
        return json_response({"status": "ok"})

    async def openapi_json(self, _req: web.Request) -> web.Response:
        return json_response(openapi.document())


def build_app(catalog: Catalog, *, token: str, store: Store | None = None,
              agent_http: aiohttp.ClientSession | None = None, state_dir: Path | None = None,
              router: tuple[str, int] | None = None, backend: str = "local",
              enforced_limits: frozenset[str] = frozenset(),
              keeper: Keeper | None = None, web_config: WebConfig | None = None,
              controller: Callable[[], str] | None = None,
              agent_key: bytes | None = None) -> web.Application:
    """The API. ``agent_http``: the session for the agents' APIs (made here when None);
    ``router``: the address to show in /v1/status (else read from ``state_dir``'s mesh.json);
    ``backend``: the kind of backend the controller runs jobs on, and ``enforced_limits``
    the spec fields (cpu, memory, disk) it enforces: a job asking for one it does not is
    created with a warning. No field counts as enforced unless the controller says so.
    ``web_config``: serve the status page too (``controller.web``); ``controller`` says
    which replica this is, and who leads, on that page. ``agent_key``: what the jobs'
    agent tokens derive from (default: the state directory's ``agent-key``)."""
    if not token:
        raise ValueError("the API needs a token")
    if agent_key is None:  # the local backend's: the state directory's agent key
        if state_dir is None:
            raise ValueError("the API needs the agent key, or a state directory holding it")
        agent_key = ensure_secret(state_dir.absolute() / AGENT_KEY_FILE).encode()
    api = Api(catalog, store, agent_http, state_dir.absolute() if state_dir else None, router,
              backend, enforced_limits, agent_key)
    app = web.Application(middlewares=[errors, auth(token)])

    async def lifetime(_app: web.Application) -> Any:
        owned = api.agent_http is None
        if owned:
            api.agent_http = aiohttp.ClientSession()
        yield
        await api.watch.close()
        if owned and api.agent_http is not None:
            await api.agent_http.close()

    app.cleanup_ctx.append(lifetime)

    def get(path: str, handler: Any) -> web.RouteDef:
        return web.get(path, handler, allow_head=False)

    app.add_routes([
        get("/v1/healthz", api.healthz),
        get("/v1/openapi.json", api.openapi_json),
        get("/v1/status", api.status),
        get("/v1/jobs", api.list_jobs),
        web.post("/v1/jobs", api.create_job),
        get("/v1/jobs/{id}", api.show_job),
        web.delete("/v1/jobs/{id}", api.delete_job),
        web.patch("/v1/jobs/{id}", api.update_job),
        web.post("/v1/jobs/{id}/pause", api.desire(DesiredState.PAUSED)),
        web.post("/v1/jobs/{id}/resume", api.desire(DesiredState.RUNNING)),
        web.post("/v1/jobs/{id}/end", api.desire(DesiredState.ENDED)),
        web.post("/v1/jobs/{id}/retry", api.retry_job),
        web.post("/v1/jobs/{id}/fork", api.fork_job),
        web.post("/v1/jobs/{id}/restore", api.restore_job),
        get("/v1/jobs/{id}/events", api.job_events),
        get("/v1/events", api.mesh_events),
        get("/v1/jobs/{id}/export", api.export),
        web.post("/v1/jobs/{id}/import", api.import_),
        get("/v1/users", api.list_users),
        web.post("/v1/users", api.create_user),
        web.delete("/v1/users/{name}", api.delete_user),
        web.put("/v1/users/{name}/password", api.set_password),
        web.post("/v1/grants", api.grant),
        web.delete("/v1/grants", api.revoke),
        *store_routes(keeper),
    ])
    if web_config is not None:
        mount(app, web_config, catalog, api.watch, keeper=keeper, router=api.router_address,
              controller=controller or (lambda: "this controller"))
    return app
