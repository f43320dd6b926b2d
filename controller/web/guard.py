"""What stands between a browser and the status page's handlers.

- **Host**: a request must name one of the page's host names (loopback, the
  listen address, and the hosts of ``--web-origin``). A DNS name an attacker
  points at 127.0.0.1 (DNS rebinding) is refused, so a page of theirs cannot
  read ours through the victim's browser.
- **Origin**: a POST must come from the page itself (``Origin``, else
  ``Referer``, naming the request's own origin or a ``--web-origin``). Forms
  also carry the session's CSRF token (``pages.py`` checks it).
- **Headers**: every answer has a Content-Security-Policy (scripts, styles
  and connections from the page's own origin only, no frames of it anywhere),
  ``nosniff``, no referrer beyond the origin, and ``no-store``.

The API (``/v1``) and ``/metrics`` are not the page's: they pass untouched, and
the cookie does not authenticate them (the API keeps its bearer token).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Middleware

log = logging.getLogger("jobmesh.controller.web")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
       " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors' elder, for old browsers
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebConfigError(ValueError):
    """A --web-origin that is not an origin; the message says why."""


@dataclass(frozen=True)
class WebConfig:
    # The addresses operators reach the page at besides loopback, as origins
    # (https://status.example.com): behind a proxy or an Ingress.
    origins: tuple[str, ...] = ()
    listen_host: str = "127.0.0.1"
    session_ttl: float = 8 * 3600.0  # seconds a login lasts
    session_idle: float = 3600.0  # ... and without a request
    hosts: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = set(LOOPBACK)
        if self.listen_host not in ("", "0.0.0.0", "::"):
            names.add(self.listen_host.strip("[]").lower())
        for origin in self.origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or (
                    parts.path not in ("", "/")) or parts.query or parts.username:
                raise WebConfigError(f"--web-origin {origin!r}: expected an origin such as "
                                     "https://status.example.com (scheme, host, port)")
            names.add(parts.hostname.lower())
        object.__setattr__(self, "hosts", frozenset(names))

    @property
    def secure(self) -> bool:
        """Whether operators reach the page over TLS (a proxy's): cookies are then
        ``Secure``, and named ``__Host-``."""
        return any(o.startswith("https://") for o in self.origins)

    @property
    def cookie(self) -> str:
        return "__Host-jobmesh_session" if self.secure else "jobmesh_session"

    def trusted_origins(self, request: web.Request) -> set[str]:
        return {f"{request.scheme}://{request.host}", *(o.rstrip("/") for o in self.origins)}


def is_page(path: str) -> bool:
    return not (path.startswith("/v1/") or path == "/v1" or path == "/metrics")


def host_name(host: str) -> str:
    """``Host``'s name without its port (``[::1]:80`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def guard(config: WebConfig,
          error_page: Callable[[web.Request, int, str, str], web.Response]
          ) -> Middleware:
    """The middleware; ``error_page(request, status, message, hint)`` renders refusals."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_page(request.path):
            return await handler(request)
        name = host_name(request.host)
        if name not in config.hosts:
            log.warning("status page: refused Host %r from %s", request.host, request.remote)
            response: web.StreamResponse = error_page(
                request, 421, f"this server does not answer to the host name {name!r}",
                "open the page at an address it knows: 127.0.0.1 or localhost, or one "
                "given to the controller with --web-origin")
        elif request.method in UNSAFE and not _same_origin(request, config):
            log.warning("status page: refused a cross-origin %s %s from %s (Origin %r)",
                        request.method, request.path, request.remote,
                        request.headers.get("Origin"))
            response = error_page(request, 403, "a request from another site was refused",
                                  "act from the status page itself")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:  # a redirect: it still gets the headers
                    with_headers(exc)
                    raise
                response = error_page(request, exc.status, exc.reason,
                                      "the overview is at /")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.error("status page: %s %s failed: %s", request.method, request.path, exc)
                response = error_page(request, 503, f"the controller cannot answer now: {exc}",
                                      "the catalog is failing; reload in a moment, and see "
                                      "the controller's log")
            except Exception:  # a bug: still a page, details in the log
                log.exception("status page: %s %s failed", request.method, request.path)
                response = error_page(request, 500, "internal error",
                                      "this is a bug; the controller's log has the details")
        return with_headers(response)

    return check


def _same_origin(request: web.Request, config: WebConfig) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        referer = request.headers.get("Referer")
        if not referer:
            return False
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin.rstrip("/") in config.trusted_origins(request)


def with_headers(response: web.StreamResponse) -> web.StreamResponse:
    """``response`` with the page's headers (a stream sets them before it starts)."""
    for key, value in HEADERS.items():
        response.headers.setdefault(key, value)
    return response
