"""``GET /live``: the catalog's changes as server-sent events, so a page follows them.

The stream says only *that* something changed (``event: change``, data: the
job's id, or ``*`` for "anything may have"); the page's script then fetches its
own live part again, rendered and escaped by the server like the page itself.
So the stream carries nothing a page view would not, and the script stays a
few lines. The job page's stream (``?job=ID``) tells only that job's changes.

One LISTEN connection serves every stream (``api.wait.JobWatch``). A comment
every ``PING`` seconds keeps proxies from closing an idle stream; the session
is checked then too, and a stream whose session ended says ``event: end``.
Streams end when the controller stops (``close_all``), so a stop never waits
on an open page.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..api.wait import JobWatch
from .guard import with_headers

PING = 15.0  # seconds between keep-alive comments (and session checks)


class LiveStreams:
    def __init__(self, watch: JobWatch, alive: Callable[[web.Request], Awaitable[bool]]) -> None:
        self.watch = watch
        self.alive = alive  # whether the request's session still holds
        self._stops: set[asyncio.Event] = set()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if not await self.alive(request):
            raise web.HTTPUnauthorized(reason="Not logged in")
        job = request.query.get("job")
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        with_headers(response)
        await response.prepare(request)
        stop = asyncio.Event()
        self._stops.add(stop)
        try:
            async with self.watch.changes() as changes:
                await response.write(b"retry: 3000\n\n")
                while not stop.is_set():
                    change = await _next(changes, stop)
                    if stop.is_set():
                        break
                    if change is _PING:
                        if not await self.alive(request):
                            await response.write(b"event: end\ndata: logged out\n\n")
                            break
                        await self.watch.relisten()
                        await response.write(b": ping\n\n")
                    elif change is None or job is None or change == job:
                        await response.write(f"event: change\ndata: {change or '*'}\n\n"
                                             .encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._stops.discard(stop)
        return response

    async def close_all(self, _app: web.Application) -> None:
        """Stop every stream (the app's on_shutdown)."""
        for stop in self._stops:
            stop.set()


_PING = object()


async def _next(changes: asyncio.Queue[str | None], stop: asyncio.Event) -> object:
    """The next change, or ``_PING`` after PING seconds without one (or at ``stop``)."""
    get = asyncio.ensure_future(changes.get())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({get, stopping}, timeout=PING,
                                     return_when=asyncio.FIRST_COMPLETED)
        return get.result() if get in done else _PING
    finally:
        for task in (get, stopping):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
