"""The HTTP client of the controller's API, for the operator CLI.

Synchronous and standard-library only (``http.client``): a CLI command makes
one or two requests, and starting fast matters more than concurrency. Large
bodies stream both ways in 1 MiB chunks with a progress callback; downloads
are checked against the length and sha256 the API announces.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlencode, urlsplit

from jobmesh.errors import one_line

CHUNK = 1 << 20
USER_AGENT = "jobmesh-cli/1"


class RequestFailed(Exception):
    """The API refused, failed or could not be reached; ``str()`` is one line for the user."""

    def __init__(self, error: str, hint: str = "", status: int | None = None) -> None:
        super().__init__(error)
        self.error, self.hint, self.status = error, hint, status

    def __str__(self) -> str:
        hint = _API_REFERENCE.sub("", self.hint)  # the CLI's words, not the API's
        text = f"{self.error} (hint: {hint})" if hint else self.error
        return one_line(text)  # one line, whatever a job's error text holds


# "(GET /v1/jobs)" in the API's hints: an API client wants it, a CLI user does not.
_API_REFERENCE = re.compile(r"\s*\((?:GET|POST|PUT|PATCH|DELETE) /v1/[^)]*\)")


@dataclass(frozen=True)
class Downloaded:
    size: int
    sha256: str
    dump_id: str


# A progress sink: called with the total (None if unknown) when the body starts to flow,
# it returns the function to call with each chunk's size.
ProgressFactory = Callable[[int | None], Callable[[int], None]]


class Readable(Protocol):
    """What an upload reads its body from: a file, or a wrapper of one."""

    def read(self, n: int, /) -> bytes: ...


def _no_progress(_total: int | None) -> Callable[[int], None]:
    return lambda _n: None


class Client:
    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestFailed(f"bad API address {base_url!r}", "expected http://HOST:PORT")
        self.base_url = base_url.rstrip("/")
        self._parts = parts
        self._prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------------

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else \
            http.client.HTTPConnection
        return cls(self._parts.hostname or "", self._parts.port,
                   timeout=timeout or self.timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT,
                "Accept": "application/json", **(extra or {})}

    def _url(self, path: str, query: dict[str, Any] | None) -> str:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        return self._prefix + path + (f"?{urlencode(q)}" if q else "")

    def _unreachable(self, exc: BaseException, timeout: float | None) -> RequestFailed:
        if isinstance(exc, TimeoutError | socket.timeout):
            return RequestFailed(f"the API at {self.base_url} did not answer within "
                                 f"{timeout or self.timeout:g} s",
                                 "the work may go on; `jobmesh job show ID` tells how far "
                                 "it got")
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return RequestFailed(f"cannot reach the API at {self.base_url}: {reason}",
                             "is the mesh running? start it with `jobmesh up`")

    def _failure(self, resp: http.client.HTTPResponse) -> RequestFailed:
        raw = resp.read()
        try:
            body = json.loads(raw)
            error, hint = str(body["error"]), str(body.get("hint") or "")
        except (ValueError, KeyError, TypeError):
            text = raw.decode("utf-8", "replace").strip().splitlines()
            return RequestFailed(f"the API answered {resp.status} {resp.reason}"
                                 + (f": {text[0][:200]}" if text else ""), "", resp.status)
        if (resp.status == 404 and error.startswith("no endpoint ")) or (
                resp.status == 405 and " is not allowed on " in error):
            # The route itself is unknown (not the job or user): an older controller.
            return RequestFailed(f"the API at {self.base_url} does not know this request "
                                 f"({error})", "is the controller older than this CLI? run "
                                 "the same jobmesh version for both", resp.status)
        return RequestFailed(error, hint, resp.status)

    # -- requests ---------------------------------------------------------------------

    def call(self, method: str, path: str, *, body: Any = None,
             query: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """One JSON request; the decoded answer (None for 204)."""
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers({"Content-Type": "application/json"} if data else None)
        conn = self._connect(timeout)
        try:
            conn.request(method, self._url(path, query), body=data, headers=headers)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise self._failure(resp)
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc, timeout) from None
        finally:
            conn.close()
        if resp.status == 204 or not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise RequestFailed(f"the API at {self.base_url} answered something that is not "
                                "JSON", "is that address really the jobmesh API?") from None

    def download(self, path: str, out: BinaryIO, *, query: dict[str, Any] | None = None,
                 timeout: float | None = None,
                 progress: ProgressFactory = _no_progress) -> Downloaded:
        """Stream a body into ``out``, verifying its length and announced sha256.

        Only connecting is bounded by ``timeout``: an export answers once the job's dump
        is stored, which takes as long as pg_dump takes (Ctrl-C gives up).
        """
        conn = self._connect(timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(None)
            conn.request("GET", self._url(path, query),
                         headers=self._headers({"Accept": "application/octet-stream"}))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise self._failure(resp)
            expected = resp.getheader("Content-Length")
            total = int(expected) if expected and expected.isdigit() else None
            advance = progress(total)
            digest, size = hashlib.sha256(), 0
            try:
                while chunk := resp.read1(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    advance(len(chunk))
            except http.client.IncompleteRead:
                pass  # reported below, with the numbers
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc, timeout) from None
        finally:
            conn.close()
        if total is not None and size != total:
            raise RequestFailed(f"the download broke off after {size} of {total} bytes",
                                "retry; the controller's log says why")
        announced = resp.getheader("X-Jobmesh-Sha256")
        if announced and announced != digest.hexdigest():
            raise RequestFailed(f"the download is corrupt: sha256 {digest.hexdigest()[:12]}..., "
                                f"expected {announced[:12]}...", "retry the export")
        return Downloaded(size, digest.hexdigest(), resp.getheader("X-Jobmesh-Dump-Id") or "")

    def upload(self, path: str, src: Readable, size: int, *,
               query: dict[str, Any] | None = None, timeout: float | None = None,
               advance: Callable[[int], None] = lambda _n: None) -> Any:
        """Stream ``size`` bytes of ``src`` as the body of a POST; the decoded JSON answer."""
        conn = self._connect(timeout)
        try:
            conn.putrequest("POST", self._url(path, query), skip_accept_encoding=True)
            for k, v in self._headers({"Content-Type": "application/octet-stream",
                                       "Content-Length": str(size)}).items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                while chunk := src.read(CHUNK):
                    conn.send(chunk)
                    advance(len(chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the API stopped reading: it has answered why
            resp = conn.getresponse()
            if resp.status >= 400:
                raise self._failure(resp)
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc, timeout) from None
        finally:
            conn.close()
        return json.loads(raw) if raw else None
