"""The status page's handlers: login and logout, the overview, a job's page, its actions.

Every page but the login needs a session (``sessions.py``): a request without
one is sent to ``/login``. Actions are POSTed forms carrying the session's CSRF
token (and ``guard.py`` checks their origin); each is the same catalog call the
API makes, recorded as an event with the principal's name, as are logins and
logouts. The templates escape every value (Jinja2's autoescape): job ids come
from the catalog's rules, but errors, progress lines and principal names come
from users and from PostgreSQL.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ..api.wait import JobWatch
from ..catalog.db import Catalog
from ..catalog.models import JOB_ID, PRINCIPAL, Conflict, NotFound
from ..catalog.passwords import password_matches, scram_verifier
from ..catalog.states import DesiredState, JobState, settled
from ..storage.keeper import Keeper
from .data import JobRow, Reader, StoreUsage
from .guard import WebConfig, guard
from .limits import LoginLimiter
from .live import LiveStreams
from .sessions import Session, Sessions
from .summary import ListQuery, ago, describe, duration, lasted, size

log = logging.getLogger("jobmesh.controller.web")

HERE = Path(__file__).parent
# What a request carries between the page's steps: its session (looked up once), and
# when its handling started (the Server-Timing header).
SESSION = web.RequestKey("session", object)
STARTED = web.RequestKey("started", float)
FRAGMENT = "X-Live-Fragment"  # the live script's request for the page's live part only
ACTIONS = {"pause": DesiredState.PAUSED, "resume": DesiredState.RUNNING,
           "end": DesiredState.ENDED}
COLUMNS = (("id", "Job"), ("state", "State"), (None, "For"), ("size", "Snapshot"),
           (None, "In store"), (None, "Clients"), ("last_active", "Last active"), (None, ""))
# A login as nobody still costs a verifier's work, so its answer's time tells nothing.
_NOBODY = scram_verifier("no such principal")


def actions(row: JobRow) -> list[str]:
    """What an operator may ask of a job in its state (end needs a confirmation)."""
    if row.desired_state == DesiredState.RUNNING:
        return ["pause", "end"]
    if row.desired_state == DesiredState.PAUSED:
        return ["resume", "end"]
    return []


def moving(state: str, desired: str) -> bool:
    """Whether the job is on its way to another state than the one it is in."""
    return state != settled(DesiredState(desired))


def safe_next(value: object) -> str:
    """Where to go after a login or an action: a path of this site, never another's."""
    text = str(value or "")
    if not text.startswith("/") or text.startswith("//") or "\\" in text or len(text) > 2000:
        return "/"
    return text


@dataclass
class StatusPage:
    config: WebConfig
    catalog: Catalog
    sessions: Sessions
    reader: Reader
    limiter: LoginLimiter
    env: jinja2.Environment
    router: Callable[[], dict[str, Any] | None]  # where clients connect

    # -- rendering ---------------------------------------------------------------------

    def render(self, request: web.Request, template: str, code: int = 200,
               **values: Any) -> web.Response:
        started = request.get(STARTED, time.perf_counter())
        values.setdefault("live_stream", False)
        body = self.env.get_template(template).render(
            session=request.get(SESSION), states=[s.value for s in JobState],
            moving=moving,
            actions=actions, columns=COLUMNS, **values)
        response = web.Response(text=body, status=code, content_type="text/html")
        response.headers["Server-Timing"] = \
            f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        return response

    def error_page(self, request: web.Request, status: int, message: str,
                   hint: str) -> web.Response:
        return self.render(request, "error.html", status, status=status, message=message,
                           hint=hint)

    # -- sessions ----------------------------------------------------------------------

    async def session_of(self, request: web.Request) -> Session | None:
        if SESSION not in request:
            sid = request.cookies.get(self.config.cookie, "")
            request[SESSION] = await self.sessions.get(sid) if sid else None
        session = request[SESSION]
        assert session is None or isinstance(session, Session)
        return session

    async def need_session(self, request: web.Request) -> Session:
        request[STARTED] = time.perf_counter()
        session = await self.session_of(request)
        if session is not None:
            return session
        if FRAGMENT in request.headers or request.method != "GET":
            raise web.HTTPUnauthorized(reason="Not logged in")
        raise web.HTTPSeeOther(f"/login?next={request.path_qs}" if request.path != "/"
                               else "/login")

    async def alive(self, request: web.Request) -> bool:
        sid = request.cookies.get(self.config.cookie, "")
        return bool(sid) and await self.sessions.get(sid) is not None

    def check_csrf(self, session: Session, form: Any) -> None:
        given = str(form.get("csrf", ""))
        if not hmac.compare_digest(given.encode(), session.csrf.encode()):
            raise web.HTTPForbidden(reason="Missing or wrong CSRF token; reload the page")

    # -- login and logout ----------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        if await self.session_of(request) is not None:
            raise web.HTTPSeeOther(safe_next(request.query.get("next")))
        return self.render(request, "login.html", next=safe_next(request.query.get("next")),
                           name="", message=None)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        name = str(form.get("name", ""))[:63]
        password = str(form.get("password", ""))[:1024]
        target = safe_next(form.get("next"))
        source = request.remote or "unknown"
        now = time.monotonic()
        wait = self.limiter.wait(source, name, now)
        if wait > 0:
            log.warning("status page: login as %r from %s refused: too many failures",
                        name, source)
            response = self.render(
                request, "login.html", 429, next=target, name=name,
                message=f"Too many failed logins from here or as {name}: try again in "
                        f"{wait:.0f} s.")
            response.headers["Retry-After"] = f"{max(1, round(wait))}"
            return response
        found = (await self.catalog.principals(name)) if PRINCIPAL.fullmatch(name) else []
        principal = found[0] if found else None
        ok = password_matches(password, principal.verifier if principal else _NOBODY)
        if principal is None or not principal.admin or not ok:
            self.limiter.failed(source, name, now)
            log.warning("status page: failed login as %r from %s", name, source)
            await self.catalog.add_event(None, "login-failed", actor=name,
                                         detail={"source": source})
            return self.render(request, "login.html", 401, next=target, name=name,
                               message="Wrong name or password (or not an admin).")
        sid, _session = await self.sessions.create(principal.name, principal.verifier, source)
        await self.catalog.add_event(None, "login", actor=principal.name,
                                     detail={"source": source})
        log.info("status page: %s logged in from %s", principal.name, source)
        response = web.HTTPSeeOther(target)
        response.set_cookie(self.config.cookie, sid, httponly=True, samesite="Strict",
                            secure=self.config.secure, path="/",
                            max_age=int(self.config.session_ttl))
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session = await self.session_of(request)
        if session is None:  # gone already (expired, or ended elsewhere): nothing to end
            response = web.HTTPSeeOther("/login")
            response.del_cookie(self.config.cookie, path="/")
            raise response
        self.check_csrf(session, await request.post())
        await self.sessions.end(request.cookies.get(self.config.cookie, ""))
        await self.catalog.add_event(None, "logout", actor=session.principal,
                                     detail={"source": request.remote or "unknown"})
        response = web.HTTPSeeOther("/login")
        response.del_cookie(self.config.cookie, path="/")
        raise response

    # -- pages -------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        await self.need_session(request)
        q = ListQuery.parse(request.query, request.query.getall("state", []))
        o = await self.reader.overview(q)
        top = [(name, u, JOB_ID.fullmatch(name) is not None) for name, u in sorted(
            (o.store.jobs.items() if o.store else []),
            key=lambda kv: -(kv[1].unique + kv[1].wal + kv[1].other))[:10]]
        template = "_overview_live.html" if FRAGMENT in request.headers else "overview.html"
        return self.render(request, template, o=o, top_store=top,
                           live_stream=True)

    async def job(self, request: web.Request) -> web.Response:
        session = await self.need_session(request)
        job_id = request.match_info["id"]
        p = await self.reader.job_page(job_id)
        if p is None:
            raise web.HTTPNotFound(reason=f"No job {job_id}")
        router = self.router()
        psql = (f'psql "host={router["host"]} port={router["port"]} dbname=job_{job_id} '
                f'user={session.principal}"' if router else
                "(the router's address is unknown to this controller)")
        template = "_job_live.html" if FRAGMENT in request.headers else "job.html"
        return self.render(request, template, p=p, psql_line=psql, live_stream=True)

    async def confirm_end(self, request: web.Request) -> web.Response:
        await self.need_session(request)
        return self.render(request, "confirm.html", job_id=request.match_info["id"])

    async def act(self, request: web.Request) -> web.Response:
        session = await self.need_session(request)
        form = await request.post()
        self.check_csrf(session, form)
        job_id, action = request.match_info["id"], request.match_info["action"]
        try:
            await self.catalog.set_desired(job_id, ACTIONS[action], actor=session.principal)
        except NotFound:
            raise web.HTTPNotFound(reason=f"No job {job_id}") from None
        except Conflict as exc:
            raise web.HTTPConflict(reason=str(exc)) from None
        log.info("status page: %s asked job %s to %s", session.principal, job_id, action)
        raise web.HTTPSeeOther(safe_next(form.get("next") or f"/jobs/{job_id}"))


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(size=size, duration=duration, ago=ago, lasted=lasted)
    env.globals["describe"] = lambda e: describe(e.kind, e.from_state, e.to_state,
                                                 e.duration_ms, e.bytes, e.detail, e.actor)
    return env


def mount(app: web.Application, config: WebConfig, catalog: Catalog, watch: JobWatch, *,
          keeper: Keeper | None, router: Callable[[], dict[str, Any] | None],
          controller: Callable[[], str]) -> None:
    """Serve the status page from ``app`` (beside the API, which it leaves alone)."""
    store = StoreUsage(keeper)
    page = StatusPage(config, catalog,
                      Sessions(catalog.pool, timedelta(seconds=config.session_ttl),
                               timedelta(seconds=config.session_idle)),
                      Reader(catalog, store, controller), LoginLimiter(), templates(), router)
    live = LiveStreams(watch, page.alive)
    # Innermost: its refusals and error pages are HTML, which the API's JSON errors
    # middleware (outside it) passes on as they are.
    app.middlewares.append(guard(config, page.error_page))
    app.on_shutdown.append(live.close_all)

    async def stop_surveys(_app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(stop_surveys)

    def get(path: str, handler: Any) -> web.RouteDef:
        return web.get(path, handler, allow_head=False)

    app.add_routes([
        get("/", page.overview),
        get("/login", page.login_form),
        web.post("/login", page.login),
        web.post("/logout", page.logout),
        get("/live", live.stream),
        get("/jobs/{id}", page.job),
        get("/jobs/{id}/end", page.confirm_end),
        web.post("/jobs/{id}/{action:pause|resume|end}", page.act),
        web.static("/static", HERE / "static", append_version=False),
    ])
