"""The catalog: jobs, principals, grants, snapshots and events in PostgreSQL (asyncpg).

It is the one source of truth. Every state change is a compare-and-set on
``jobs.state`` plus an ``events`` row in the same transaction, so two
controllers (or a controller and its own restarted self) never both apply a
transition. Triggers announce changes with ``NOTIFY`` on two channels:
``jobmesh_jobs`` (payload: the job id) and ``jobmesh_principals`` (payload:
the principal's name); routers and the controller ``LISTEN`` and re-read.

Routers use this module too (DESIGN.md: ``router -> controller.catalog``),
so it imports nothing else of the controller.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

JOBS_CHANNEL = "jobmesh_jobs"
PRINCIPALS_CHANNEL = "jobmesh_principals"
JOB_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,58}")
PRINCIPAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}")
PATTERN = re.compile(r"[a-z0-9_*?\[\]-]{1,63}")
MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x6A6F626D657368  # "jobmesh": one migrator at a time


class CatalogError(Exception):
    """A request the catalog refuses; the message says why, for the user."""


class NotFound(CatalogError):
    pass


class Conflict(CatalogError):
    pass


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    desired_state: str
    host: str | None
    port: int | None
    agent_url: str | None
    backend_password: str
    spec: dict[str, Any]
    progress: str | None
    error: str | None
    attempts: int
    last_active: datetime
    created_at: datetime
    updated_at: datetime

    @property
    def database(self) -> str:
        return f"job_{self.id}"

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the backend password."""
        return {
            "id": self.id, "state": self.state, "desired_state": self.desired_state,
            "host": self.host, "port": self.port, "agent_url": self.agent_url,
            "spec": self.spec, "progress": self.progress, "error": self.error,
            "attempts": self.attempts, "last_active": self.last_active.isoformat(),
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class Grant:
    pattern: str
    access: str  # "read" or "write"


@dataclass(frozen=True)
class PrincipalRow:
    name: str
    verifier: str
    admin: bool
    grants: tuple[Grant, ...]


@dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    duration_ms: float | None
    bytes: int | None
    detail: dict[str, Any]

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "job_id": self.job_id, "at": self.at.isoformat(),
                "kind": self.kind, "from_state": self.from_state, "to_state": self.to_state,
                "duration_ms": self.duration_ms, "bytes": self.bytes, "detail": self.detail}


def _job(row: asyncpg.Record) -> Job:
    return Job(**{k: row[k] for k in Job.__dataclass_fields__})


def _event(row: asyncpg.Record) -> Event:
    return Event(**{k: row[k] for k in Event.__dataclass_fields__})


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


def check_job_id(job_id: str) -> None:
    if not JOB_ID.fullmatch(job_id):
        raise CatalogError(f"bad job id {job_id!r}: use a-z, 0-9, '-' and '_', starting "
                           "with a letter or digit, at most 59 characters")


def check_principal(name: str) -> None:
    if not PRINCIPAL.fullmatch(name):
        raise CatalogError(f"bad user name {name!r}: use letters, digits, '_', '.', '@' "
                           "and '-', at most 63 characters")


def check_pattern(pattern: str) -> None:
    if not PATTERN.fullmatch(pattern):
        raise CatalogError(f"bad job pattern {pattern!r}: a job id or a glob such as "
                           "'scrape-*' or '*'")


class Catalog:
    """A pool of catalog connections and the queries the components need."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 5) -> Catalog:
        try:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                             init=_init_connection)
        except (OSError, asyncpg.PostgresError) as exc:
            raise CatalogError(f"cannot reach the catalog: {exc}") from exc
        assert pool is not None
        return cls(pool, dsn)

    async def close(self) -> None:
        await self.pool.close()

    # --- schema --------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply the migrations not yet applied, in order; returns their versions."""
        applied: list[int] = []
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                                   " version integer PRIMARY KEY,"
                                   " name text NOT NULL,"
                                   " applied_at timestamptz NOT NULL DEFAULT now())")
                done = {r["version"] for r in
                        await conn.fetch("SELECT version FROM schema_migrations")}
                for version, path in migrations():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(path.read_text())
                        await conn.execute("INSERT INTO schema_migrations (version, name)"
                                           " VALUES ($1, $2)", version, path.name)
                    applied.append(version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        return applied

    # --- jobs ------------------------------------------------------------------------

    async def create_job(self, job_id: str, spec: dict[str, Any] | None = None) -> Job:
        check_job_id(job_id)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO jobs (id, desired_state, state, backend_password, spec)"
                " VALUES ($1, 'running', 'creating', $2, $3)"
                " ON CONFLICT (id) DO NOTHING RETURNING *",
                job_id, secrets.token_urlsafe(24), spec or {})
            if row is None:
                raise Conflict(f"job {job_id} already exists")
            await _insert_event(conn, job_id, "created", None, "creating", detail=spec or {})
        return _job(row)

    async def job(self, job_id: str) -> Job | None:
        row = await self.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        return _job(row) if row else None

    async def jobs(self) -> list[Job]:
        return [_job(r) for r in await self.pool.fetch("SELECT * FROM jobs ORDER BY id")]

    async def set_desired(self, job_id: str, desired: str) -> Job:
        """The operator's wish (pause, resume, end, delete); the reconciler does the rest."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            if row["desired_state"] == "deleted" and desired != "deleted":
                raise Conflict(f"job {job_id} is being deleted")
            if row["desired_state"] != desired:
                row = await conn.fetchrow(
                    "UPDATE jobs SET desired_state = $2, attempts = 0, updated_at = now()"
                    " WHERE id = $1 RETURNING *", job_id, desired)
                await _insert_event(conn, job_id, "desired", None, None,
                                    detail={"desired_state": desired})
        return _job(row)

    async def request_wake(self, job_id: str) -> Job | None:
        """A client wants this job: want it running unless it was ended or deleted.

        Idempotent: however many clients (on however many routers) ask, only the
        first changes the row, so there is one wake-requested event and one resume.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE jobs SET desired_state = 'running', last_active = now(),"
                " attempts = 0, updated_at = now()"
                " WHERE id = $1 AND desired_state = 'paused' RETURNING *", job_id)
            if row is not None:
                await _insert_event(conn, job_id, "wake-requested", row["state"], None)
                return _job(row)
        return await self.job(job_id)

    async def transition(self, job_id: str, from_state: str, to_state: str, *,
                         host: str | None = None, port: int | None = None,
                         agent_url: str | None = None, error: str | None = None,
                         duration_ms: float | None = None, bytes_moved: int | None = None,
                         detail: dict[str, Any] | None = None) -> Job | None:
        """Compare-and-set the state, recording an event; None if the state was not
        ``from_state`` (someone else moved it). The address is kept only while the
        job is reachable (running) or being worked on; it is cleared otherwise."""
        keep_address = to_state in ("running", "pausing", "ending")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE jobs SET state = $3,"
                " host = CASE WHEN $4::bool THEN COALESCE($5, host) END,"
                " port = CASE WHEN $4::bool THEN COALESCE($6, port) END,"
                " agent_url = CASE WHEN $4::bool THEN COALESCE($7, agent_url) END,"
                " error = $8, progress = NULL,"
                " attempts = CASE WHEN $8::text IS NULL THEN 0 ELSE attempts END,"
                " last_active = CASE WHEN $3 = 'running' THEN now() ELSE last_active END,"
                " updated_at = now()"
                " WHERE id = $1 AND state = $2 RETURNING *",
                job_id, from_state, to_state, keep_address, host, port, agent_url, error)
            if row is None:
                return None
            await _insert_event(conn, job_id, "transition", from_state, to_state,
                                duration_ms=duration_ms, bytes_moved=bytes_moved,
                                detail=detail or ({"error": error} if error else {}))
        return _job(row)

    async def pause_if_idle(self, job_id: str, idle_seconds: float, *,
                            reason: str = "idle") -> bool:
        """Want ``job_id`` paused if no router touched it for ``idle_seconds`` (checked in
        the same statement, so a client arriving just now keeps it running)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE jobs SET desired_state = 'paused', updated_at = now()"
                " WHERE id = $1 AND desired_state = 'running' AND state = 'running'"
                " AND last_active < now() - make_interval(secs => $2) RETURNING id",
                job_id, idle_seconds)
            if row is None:
                return False
            await _insert_event(conn, job_id, reason, "running", None,
                                detail={"idle_seconds": idle_seconds})
        return True

    async def failed_attempt(self, job_id: str, state: str, error: str) -> None:
        """A transition's work failed; it stays in ``state`` and is retried later."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE jobs SET error = $3, progress = NULL, attempts = attempts + 1,"
                " updated_at = now() WHERE id = $1 AND state = $2", job_id, state, error)
            await _insert_event(conn, job_id, "error", state, None, detail={"error": error})

    async def set_progress(self, job_id: str, text: str | None) -> None:
        await self.pool.execute("UPDATE jobs SET progress = $2 WHERE id = $1", job_id, text)

    async def touch(self, job_ids: Iterable[str]) -> None:
        """Routers: these jobs had client sessions just now (idle pause reads it)."""
        ids = list(job_ids)
        if ids:
            await self.pool.execute("UPDATE jobs SET last_active = now() WHERE id = ANY($1)",
                                    ids)

    async def delete_job_row(self, job_id: str) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.execute("DELETE FROM jobs WHERE id = $1 AND state = 'deleting'",
                                      job_id)
            if done.endswith(" 0"):
                return False
            await _insert_event(conn, job_id, "transition", "deleting", "deleted")
        return True

    # --- snapshots -----------------------------------------------------------------

    async def record_snapshot(self, job_id: str, manifest: dict[str, Any]) -> None:
        await self.pool.execute(
            "INSERT INTO snapshots (job_id, id, kind, size_bytes, stored_bytes, manifest)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, id) DO NOTHING",
            job_id, manifest["id"], manifest.get("kind", "pause"),
            manifest.get("uncompressed_size"),
            sum(o.get("size", 0) for o in manifest.get("objects", [])), manifest)

    async def snapshots(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT id, kind, size_bytes, stored_bytes, created_at FROM snapshots"
            " WHERE job_id = $1 ORDER BY created_at", job_id)
        return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]

    # --- events ----------------------------------------------------------------------

    async def add_event(self, job_id: str, kind: str, **fields: Any) -> None:
        async with self.pool.acquire() as conn:
            await _insert_event(conn, job_id, kind, fields.pop("from_state", None),
                                fields.pop("to_state", None), **fields)

    async def events(self, job_id: str | None = None, *, kind: str | None = None,
                     limit: int = 1000) -> list[Event]:
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT * FROM events WHERE ($1::text IS NULL OR job_id = $1)"
            " AND ($2::text IS NULL OR kind = $2) ORDER BY id DESC LIMIT $3) e ORDER BY id",
            job_id, kind, limit)
        return [_event(r) for r in rows]

    # --- principals and grants ---------------------------------------------------------

    async def create_principal(self, name: str, verifier: str, *, admin: bool = False) -> None:
        check_principal(name)
        done = await self.pool.execute(
            "INSERT INTO principals (name, verifier, admin) VALUES ($1, $2, $3)"
            " ON CONFLICT (name) DO NOTHING", name, verifier, admin)
        if done.endswith(" 0"):
            raise Conflict(f"user {name} already exists")

    async def set_verifier(self, name: str, verifier: str) -> None:
        done = await self.pool.execute("UPDATE principals SET verifier = $2 WHERE name = $1",
                                       name, verifier)
        if done.endswith(" 0"):
            raise NotFound(f"no user {name}")

    async def delete_principal(self, name: str) -> None:
        done = await self.pool.execute("DELETE FROM principals WHERE name = $1", name)
        if done.endswith(" 0"):
            raise NotFound(f"no user {name}")

    async def grant(self, name: str, pattern: str, access: str) -> None:
        check_pattern(pattern)
        if access not in ("read", "write"):
            raise CatalogError("access must be read or write")
        try:
            await self.pool.execute(
                "INSERT INTO grants (principal, pattern, access) VALUES ($1, $2, $3)"
                " ON CONFLICT (principal, pattern) DO UPDATE SET access = EXCLUDED.access",
                name, pattern, access)
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"no user {name}") from None

    async def revoke(self, name: str, pattern: str) -> None:
        done = await self.pool.execute(
            "DELETE FROM grants WHERE principal = $1 AND pattern = $2", name, pattern)
        if done.endswith(" 0"):
            raise NotFound(f"user {name} has no grant on {pattern!r}")

    async def principals(self, name: str | None = None) -> list[PrincipalRow]:
        rows = await self.pool.fetch(
            "SELECT p.name, p.verifier, p.admin,"
            " COALESCE(array_agg(g.pattern || ':' || g.access ORDER BY g.pattern)"
            "   FILTER (WHERE g.pattern IS NOT NULL), '{}') AS grants"
            " FROM principals p LEFT JOIN grants g ON g.principal = p.name"
            " WHERE $1::text IS NULL OR p.name = $1 GROUP BY p.name ORDER BY p.name", name)
        return [PrincipalRow(r["name"], r["verifier"], r["admin"],
                             tuple(Grant(*g.rsplit(":", 1)) for g in r["grants"]))
                for r in rows]

    # --- notifications -------------------------------------------------------------------

    async def listen(self, callbacks: dict[str, Callable[[str], None]],
                     on_lost: Callable[[], None] | None = None) -> asyncpg.Connection:
        """A dedicated connection LISTENing on ``callbacks``' channels (payload -> callback).

        The caller closes it. ``on_lost`` runs if the connection dies, so the caller can
        resync and listen again (nothing is announced while nobody listens).
        """
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn)
        for channel, callback in callbacks.items():
            await conn.add_listener(channel, _relay(callback))
        if on_lost is not None:
            conn.add_termination_listener(lambda _c: on_lost())
        return conn


def _relay(callback: Callable[[str], None]) -> Callable[..., None]:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)
    return on_notify


def migrations() -> list[tuple[int, Path]]:
    """``NNNN_name.sql`` files beside this module, by version."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        prefix = path.name.split("_", 1)[0]
        if prefix.isdigit():
            found.append((int(prefix), path))
    return found


async def _insert_event(conn: asyncpg.Connection, job_id: str, kind: str,
                        from_state: str | None, to_state: str | None, *,
                        duration_ms: float | None = None, bytes_moved: int | None = None,
                        detail: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO events (job_id, kind, from_state, to_state, duration_ms, bytes, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        job_id, kind, from_state, to_state, duration_ms, bytes_moved, detail or {})
