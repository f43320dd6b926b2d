"""Operators' sessions on the status page, kept in the catalog (``web_sessions``).

A login makes a random id (32 bytes), sent once as an HttpOnly, SameSite=Strict
cookie; the catalog keeps only its sha256, so a reader of the catalog cannot
use a session, and every controller replica knows every session (a Kubernetes
Service may send each request to another replica). Each session has its own
CSRF token, which every form carries.

A session ends at logout, ``ttl`` after login, ``idle`` after its last
request, when its principal is deleted or loses admin, and when the
principal's password changes (the session remembers the verifier's md5, a
change detector, not a secret).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

TOUCH_EVERY = timedelta(seconds=60)  # a session's last-seen time is written at most this often


@dataclass(frozen=True)
class Session:
    principal: str
    csrf: str
    created_at: datetime
    expires_at: datetime


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


class Sessions:
    def __init__(self, pool: asyncpg.Pool, ttl: timedelta, idle: timedelta) -> None:
        self.pool, self.ttl, self.idle = pool, ttl, idle

    async def create(self, principal: str, verifier: str, source: str) -> tuple[str, Session]:
        """A new session of ``principal``: its id (for the cookie) and the session."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        row = await self.pool.fetchrow(
            "INSERT INTO web_sessions (id_sha256, principal, verifier_md5, csrf, source,"
            " expires_at) VALUES ($1, $2, md5($3), $4, $5, now() + $6::interval)"
            " RETURNING created_at, expires_at",
            _digest(session_id), principal, verifier, csrf, source, self.ttl)
        assert row is not None
        # Expired sessions go as new ones come (an index scan; nothing else deletes them).
        await self.pool.execute("DELETE FROM web_sessions WHERE expires_at < now()"
                                " OR seen_at < now() - $1::interval", self.idle)
        return session_id, Session(principal, csrf, row["created_at"], row["expires_at"])

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id (None: unknown, expired, or its principal is no
        longer an admin with the password it logged in with)."""
        if not session_id or len(session_id) > 100:
            return None
        row = await self.pool.fetchrow(
            "SELECT s.principal, s.csrf, s.created_at, s.expires_at,"
            " s.seen_at < now() - $2::interval AS stale"
            " FROM web_sessions s JOIN principals p ON p.name = s.principal"
            " WHERE s.id_sha256 = $1 AND s.expires_at > now()"
            " AND s.seen_at > now() - $3::interval"
            " AND p.admin AND md5(p.verifier) = s.verifier_md5",
            _digest(session_id), TOUCH_EVERY, self.idle)
        if row is None:
            return None
        if row["stale"]:
            await self.pool.execute("UPDATE web_sessions SET seen_at = now()"
                                    " WHERE id_sha256 = $1", _digest(session_id))
        return Session(row["principal"], row["csrf"], row["created_at"], row["expires_at"])

    async def end(self, session_id: str) -> None:
        await self.pool.execute("DELETE FROM web_sessions WHERE id_sha256 = $1",
                                _digest(session_id))
