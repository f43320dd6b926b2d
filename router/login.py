"""The router logging in to a job's PostgreSQL, for a session or for a pool.

``open_backend`` connects, runs the sans-IO ``BackendHandshake`` and returns
the logged-in connection with its key and ParameterStatus messages, or
raises what the caller tells the client: ``NotAnswering`` (nobody there, or
PostgreSQL starting up: a held client tries again), ``Refused`` (PostgreSQL
said no; its ErrorResponse is for the client), ``Crowded`` (too many
clients while the router keeps idle connections it could close), or a
``ClientError`` for everything retrying will not fix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import errors
from . import protocol as pg
from .backend_handshake import (
    BackendAuthFailed,
    BackendError,
    BackendHandshake,
    KeyData,
    Ready,
    Relay,
    Send,
)
from .errors import ClientError
from .inbox import ConnectionClosed, Inbox
from .pool import Crowded
from .routes import JobRoute

log = logging.getLogger(__name__)


class Refused(Exception):
    """The backend refused the login; ``raw`` is its ErrorResponse, to relay."""

    def __init__(self, code: str, raw: bytes) -> None:
        super().__init__(code)
        self.code, self.raw = code, raw


async def backend_login(
    backend: Inbox, handshake: BackendHandshake, relay: Callable[[bytes], None],
    crowded: Callable[[], bool] | None = None,
) -> tuple[Ready, KeyData, list[bytes]]:
    """Log in; the backend's ReadyForQuery, key and ParameterStatus messages (what a later
    client of a pooled connection is told again). ``relay`` gets what the client is told."""
    key = KeyData(0, b"\0" * 4)
    status: list[bytes] = []
    while True:
        event = handshake.next_event()
        if event is None:
            handshake.receive_data(await backend.read())
        elif isinstance(event, Send):
            backend.write(event.data)
        elif isinstance(event, Relay):
            relay(event.data)
            if event.data[:1] == b"S":
                status.append(event.data)
        elif isinstance(event, KeyData):
            key = event
        elif isinstance(event, BackendError):
            code = event.fields.get("C", "XX000")
            if code == "57P03":  # starting up, in recovery, shutting down: not there yet
                message = event.fields.get("M", "cannot connect now")
                error = ClientError(code, message, event.fields.get("H"))
                raise errors.NotAnswering(error, message)
            if code == "53300" and crowded is not None and crowded():
                raise Crowded
            raise Refused(code, event.raw)
        else:
            assert isinstance(event, Ready)
            return event, key, status


async def open_backend(
    job: JobRoute, forwarded: dict[str, str], relay: Callable[[bytes], None],
    timeout: float, crowded: Callable[[], bool] | None = None,
) -> tuple[Inbox, Ready, KeyData, list[bytes]]:
    """A fresh connection to ``job``'s backend, logged in (closed on any failure)."""
    loop = asyncio.get_running_loop()
    handshake = BackendHandshake(job.user, job.database, job.password, forwarded)
    backend: Inbox | None = None
    done = False
    try:
        async with asyncio.timeout(timeout):
            _, backend = await loop.create_connection(Inbox, job.host, job.port)
            backend.write(handshake.startup_bytes())
            ready, key, status = await backend_login(backend, handshake, relay, crowded)
        done = True
        return backend, ready, key, status
    except (ConnectionRefusedError, ConnectionResetError, ConnectionClosed) as exc:
        detail = getattr(exc, "strerror", None) or "connection closed during login"
        where = f"{job.host}:{job.port}: {detail}"
        raise errors.NotAnswering(errors.unreachable(job.job_id, where), detail) from exc
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise errors.unreachable(job.job_id, f"{job.host}:{job.port}: {detail}") from exc
    except TimeoutError as exc:
        raise errors.unreachable(job.job_id, "timed out logging in") from exc
    except (BackendAuthFailed, pg.ProtocolViolation) as exc:
        log.warning("job %s: backend login failed: %s", job.job_id, exc)
        raise errors.unreachable(job.job_id, "the router's backend login failed") from exc
    finally:
        if backend is not None and not done:
            backend.close()
