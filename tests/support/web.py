"""The status page from a test's side: an HTTP client that logs in like a browser form
(cookie jar, CSRF token read from the page), and a headless Chromium (Debian's
chromium driven by Playwright) that saves screenshots as test artifacts."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Without the networking flags Chromium keeps trying hosts this closed machine refuses;
# as root it needs --no-sandbox.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(os.environ.get("JOBMESH_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / "test-artifacts")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class PageClient:
    """One browser-like visitor of the page at ``url`` (its own cookie jar)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.origin = url

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        kwargs.setdefault("allow_redirects", False)
        async with self.http.get(self.url + path, **kwargs) as resp:
            return resp.status, await resp.text(), resp

    async def post(self, path: str, form: dict[str, str], *, origin: str | None = "",
                   **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        """A form POST with ``Origin`` set as a browser does (``origin=None``: none)."""
        headers = dict(kwargs.pop("headers", {}))
        if origin is not None:
            headers["Origin"] = origin or self.origin
        async with self.http.post(self.url + path, data=form, headers=headers,
                                  allow_redirects=False, **kwargs) as resp:
            return resp.status, await resp.text(), resp

    async def login(self, name: str, password: str) -> aiohttp.ClientResponse:
        status, body, resp = await self.post("/login", {"name": name, "password": password,
                                                        "next": "/"})
        assert status == 303, (status, body)
        return resp

    async def csrf(self, path: str = "/") -> str:
        status, body, _ = await self.get(path)
        assert status == 200, (status, body)
        m = CSRF.search(body)
        assert m, body
        return m.group(1)


@contextlib.asynccontextmanager
async def page_client(url: str) -> AsyncIterator[PageClient]:
    client = PageClient(url)
    try:
        yield client
    finally:
        await client.close()


def need_chromium() -> None:
    """Fail (not skip) without the browser: `make test` installs it."""
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it as root "
                    "(apt-get install chromium); the status page's tests need a real browser")


def artifact(name: str) -> Path:
    """Where a test saves a screenshot: kept after the run, never committed."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
