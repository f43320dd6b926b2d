"""The catalog's queries: jobs, principals, grants, snapshots and events in PostgreSQL (asyncpg).

The catalog is the one source of truth. Every state change is a
compare-and-set on ``jobs.state`` plus an ``events`` row in the same
transaction, so two controllers (or a controller and its own restarted
self) never both apply a transition. Triggers announce changes with
``NOTIFY`` on two channels: ``jobmesh_jobs`` (payload: the job id) and
``jobmesh_principals`` (payload: the principal's name); routers and the
controller ``LISTEN`` and re-read. A router that finds a running job's
PostgreSQL not answering says so on ``jobmesh_check``, so that the
controller's health check looks at the job at once.

Routers use the catalog package too (an import contract: the router imports
``jobmesh.controller.catalog`` and nothing else of the controller), so it
imports nothing else of the controller. The values it returns are in
``models.py``; the schema and its migrations in ``schema.py``.

At ~435 lines it is one class over one connection pool: every query the
catalog answers, so that its transactions and locks are read in one place; the
SQL functions (leases, the router registry) live in the migrations.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from . import schema
from .models import (
    CHECK_CHANNEL,
    JOBS_CHANNEL,
    CatalogError,
    Conflict,
    Event,
    Grant,
    Job,
    NotFound,
    PrincipalRow,
    check_access,
    check_job_id,
    check_pattern,
    check_principal,
)
from .states import Access, DesiredState, JobState

# What a new start on a job's work resets: no failed attempts, no retry due, nothing
# given up on (the error stays, for `job show`, until a transition succeeds).
_FRESH_ATTEMPTS = "attempts = 0, next_attempt_at = NULL, gave_up = false"


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


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
        return await schema.migrate(self.pool)

    # --- jobs ------------------------------------------------------------------------

    async def create_job(self, job_id: str, spec: dict[str, Any] | None = None, *,
                         actor: str | None = None) -> Job:
        check_job_id(job_id)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO jobs (id, desired_state, state, backend_password, spec)"
                " VALUES ($1, 'running', 'creating', $2, $3)"
                " ON CONFLICT (id) DO NOTHING RETURNING *",
                job_id, secrets.token_urlsafe(24), spec or {})
            if row is None:
                raise Conflict(f"job {job_id} already exists")
            await _insert_event(conn, job_id, "created", None, JobState.CREATING,
                                detail=spec or {}, actor=actor)
        return Job.from_row(row)

    async def set_spec_field(self, job_id: str, key: str, value: Any) -> Job:
        """Set one field of a job's spec (what a rewind asks of the next resume)."""
        row = await self.pool.fetchrow(
            "UPDATE jobs SET spec = spec || jsonb_build_object($2::text, $3::jsonb)"
            " WHERE id = $1 RETURNING *", job_id, key, value)
        if row is None:
            raise NotFound(f"no job {job_id}")
        return Job.from_row(row)

    async def update_spec(self, job_id: str, changes: dict[str, Any]) -> Job:
        """Merge ``changes`` into a job's spec (announced: routers re-read the row), with an
        event saying what changed."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("UPDATE jobs SET spec = spec || $2::jsonb, "
                                      "updated_at = now() WHERE id = $1 RETURNING *",
                                      job_id, changes)
            if row is None:
                raise NotFound(f"no job {job_id}")
            await _insert_event(conn, job_id, "spec-updated", None, None, detail=changes)
            # (the row's trigger announces the columns routing reads, not the spec)
            await conn.execute("SELECT pg_notify($1, $2)", JOBS_CHANNEL, job_id)
        return Job.from_row(row)

    async def lease_slots(self, job_id: str, router_id: str, need: int, want: int,
                          ttl: float) -> int:
        """Lease (renew, shrink) ``router_id``'s slots of the job's max_connections for
        ``ttl`` seconds: ``want``, or ``need`` while another router is short; the slots
        granted (migration 0004)."""
        granted = await self.pool.fetchval("SELECT jobmesh_lease_slots($1, $2, $3, $4, $5)",
                                           job_id, router_id, need, want, ttl)
        return int(granted or 0)

    async def router_heartbeat(self, router_id: str, host: str, port: int,
                               ttl: float) -> list[tuple[str, int]]:
        """Register (renew) a router's peer address; the other live routers' (migration
        0005)."""
        rows = await self.pool.fetch("SELECT * FROM jobmesh_router_heartbeat($1, $2, $3, $4)",
                                     router_id, host, port, ttl)
        return sorted((r["o_host"], r["o_port"]) for r in rows)

    async def job(self, job_id: str) -> Job | None:
        row = await self.pool.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
        return Job.from_row(row) if row else None

    async def jobs(self) -> list[Job]:
        return [Job.from_row(r) for r in await self.pool.fetch("SELECT * FROM jobs ORDER BY id")]

    async def set_desired(self, job_id: str, desired: DesiredState, *,
                          actor: str | None = None) -> Job:
        """The operator's wish (pause, resume, end, delete); the reconciler does the rest.
        ``actor``: who asked (a principal's name), recorded in the event."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            if (row["desired_state"] == DesiredState.DELETED
                    and desired != DesiredState.DELETED):
                raise Conflict(f"job {job_id} is being deleted")
            if row["desired_state"] != desired:
                # Something new is wanted: whatever gave up before is tried again.
                row = await conn.fetchrow(
                    f"UPDATE jobs SET desired_state = $2, {_FRESH_ATTEMPTS}, updated_at = now()"
                    " WHERE id = $1 RETURNING *", job_id, desired)
                assert row is not None  # locked FOR UPDATE above: it is still there
                await _insert_event(conn, job_id, "desired", None, None,
                                    detail={"desired_state": desired}, actor=actor)
        return Job.from_row(row)

    async def request_wake(self, job_id: str) -> Job | None:
        """A client wants this job: want it running unless it was ended or deleted.

        Idempotent: however many clients (on however many routers) ask, only the
        first changes the row, so there is one wake-requested event and one resume.
        """
        try:  # a function (migration 0008): routers may not UPDATE jobs themselves
            row = await self.pool.fetchrow("SELECT * FROM jobmesh_request_wake($1)", job_id)
        except asyncpg.UndefinedFunctionError:  # a catalog not yet migrated (routers first)
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "UPDATE jobs SET desired_state = 'running', last_active = now(),"
                    f" {_FRESH_ATTEMPTS}, updated_at = now()"
                    " WHERE id = $1 AND desired_state = 'paused' RETURNING *", job_id)
                if row is not None:
                    await _insert_event(conn, job_id, "wake-requested", row["state"], None)
        return Job.from_row(row) if row is not None else await self.job(job_id)

    async def request_pause(self, job_id: str, actor: str | None) -> Job:
        """The router's admin console: want a running job paused (migration 0008's
        function, which is all a router may do of the kind). NotFound, or Conflict for a
        job being deleted; a job wanted anything but running is left as it is."""
        row = await self.pool.fetchrow("SELECT * FROM jobmesh_request_pause($1, $2)",
                                       job_id, actor)
        if row is None:
            raise NotFound(f"no job {job_id}")
        if row["desired_state"] == DesiredState.DELETED:
            raise Conflict(f"job {job_id} is being deleted")
        return Job.from_row(row)

    async def transition(self, job_id: str, from_state: JobState, to_state: JobState, *,
                         host: str | None = None, port: int | None = None,
                         agent_url: str | None = None, error: str | None = None,
                         duration_ms: float | None = None, bytes_moved: int | None = None,
                         detail: dict[str, Any] | None = None) -> Job | None:
        """Compare-and-set the state, recording an event; None if the state was not
        ``from_state`` (someone else moved it). The address is kept only while the
        job is reachable (running) or being worked on; it is cleared otherwise. A new
        state is a new step: no retry is due and nothing has been given up on."""
        keep_address = to_state in (JobState.RUNNING, JobState.PAUSING, JobState.ENDING)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE jobs SET state = $3,"
                " host = CASE WHEN $4::bool THEN COALESCE($5, host) END,"
                " port = CASE WHEN $4::bool THEN COALESCE($6, port) END,"
                " agent_url = CASE WHEN $4::bool THEN COALESCE($7, agent_url) END,"
                " error = $8, progress = NULL,"
                " attempts = CASE WHEN $8::text IS NULL THEN 0 ELSE attempts END,"
                " next_attempt_at = NULL, gave_up = false,"
                " last_active = CASE WHEN $3 = 'running' THEN now() ELSE last_active END,"
                " updated_at = now()"
                " WHERE id = $1 AND state = $2 RETURNING *",
                job_id, from_state, to_state, keep_address, host, port, agent_url, error)
            if row is None:
                return None
            await _insert_event(conn, job_id, "transition", from_state, to_state,
                                duration_ms=duration_ms, bytes_moved=bytes_moved,
                                detail=detail or ({"error": error} if error else {}))
        return Job.from_row(row)

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
            await _insert_event(conn, job_id, reason, JobState.RUNNING, None,
                                detail={"idle_seconds": idle_seconds})
        return True

    async def failed_attempt(self, job_id: str, state: JobState, error: str, *,
                             next_attempt_at: datetime | None = None,
                             gave_up: bool = False) -> Job | None:
        """A transition's work failed; the job stays in ``state``. It is retried at
        ``next_attempt_at``, or (``gave_up``) not at all: retrying cannot fix ``error``.
        None if the job is no longer in ``state``."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE jobs SET error = $3, progress = NULL, attempts = attempts + 1,"
                " next_attempt_at = CASE WHEN $5::bool THEN NULL ELSE $4::timestamptz END,"
                " gave_up = $5,"
                " updated_at = now() WHERE id = $1 AND state = $2 RETURNING *",
                job_id, state, error, next_attempt_at, gave_up)
            if row is None:
                return None
            detail: dict[str, Any] = {"error": error}
            if gave_up:
                detail["gave_up"] = True
            elif next_attempt_at is not None:
                detail["next_attempt_at"] = next_attempt_at.isoformat()
            await _insert_event(conn, job_id, "error", state, None, detail=detail)
        return Job.from_row(row)

    async def retry(self, job_id: str) -> Job:
        """The user's "try again": whatever the controller gave up on, or is waiting to
        retry, is attempted now (the reconciler is kicked by the row's NOTIFY)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE jobs SET {_FRESH_ATTEMPTS}, updated_at = now() WHERE id = $1"
                " RETURNING *", job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            await _insert_event(conn, job_id, "retry", row["state"], None)
        return Job.from_row(row)

    async def next_generation(self, job_id: str) -> int:
        """The next incarnation's generation (``agent/fence.py``): each call a new one."""
        generation = await self.pool.fetchval(
            "UPDATE jobs SET generation = generation + 1 WHERE id = $1 RETURNING generation",
            job_id)
        if generation is None:
            raise NotFound(f"no job {job_id}")
        return int(generation)

    async def set_progress(self, job_id: str, text: str | None) -> None:
        await self.pool.execute("UPDATE jobs SET progress = $2 WHERE id = $1", job_id, text)

    async def report_unreachable(self, job_id: str) -> None:
        """A router could not reach the job's PostgreSQL: the controller checks it now."""
        await self.pool.execute("SELECT pg_notify($1, $2)", CHECK_CHANNEL, job_id)

    async def report_activity(self, router: str, listen: str, clients: dict[str, int],
                              touch: list[str], ttl: float) -> None:
        """A router's report: its clients per job now (the jobs it used are touched, and
        ``touch`` besides), valid for ``ttl`` seconds (migration 0007)."""
        try:
            await self.pool.execute("SELECT jobmesh_router_report($1, $2, $3, $4, $5)",
                                    router, listen, clients, touch, ttl)
        except asyncpg.UndefinedFunctionError:
            # A catalog not yet migrated to 0007 (a rolling upgrade, routers first): the
            # idle clocks must still be reset, or jobs in use would be paused.
            if ttl > 0:
                await self.touch([*clients, *touch])

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
            await _insert_event(conn, job_id, "transition", JobState.DELETING,
                                DesiredState.DELETED)
        return True

    # --- snapshots -----------------------------------------------------------------

    async def record_snapshot(self, job_id: str, manifest: dict[str, Any]) -> None:
        await self.pool.execute(
            "INSERT INTO snapshots (job_id, id, kind, size_bytes, stored_bytes, manifest)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (job_id, id) DO NOTHING",
            job_id, manifest["id"], manifest.get("kind", "pause"),
            manifest.get("uncompressed_size"),
            manifest.get("stored_size",
                         sum(o.get("size", 0) for o in manifest.get("objects", []))), manifest)

    async def snapshots(self, job_id: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT id, kind, size_bytes, stored_bytes, created_at FROM snapshots"
            " WHERE job_id = $1 ORDER BY created_at", job_id)
        return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]

    # --- events ----------------------------------------------------------------------

    async def add_event(self, job_id: str | None, kind: str, **fields: Any) -> None:
        """An event of ``job_id``, or of the mesh (None: a login, say)."""
        async with self.pool.acquire() as conn:
            await _insert_event(conn, job_id, kind, fields.pop("from_state", None),
                                fields.pop("to_state", None), **fields)

    async def events(self, job_id: str | None = None, *, kind: str | None = None,
                     limit: int = 1000) -> list[Event]:
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT * FROM events WHERE ($1::text IS NULL OR job_id = $1)"
            " AND ($2::text IS NULL OR kind = $2) ORDER BY id DESC LIMIT $3) e ORDER BY id",
            job_id, kind, limit)
        return [Event.from_row(r) for r in rows]

    # --- principals and grants ---------------------------------------------------------

    async def create_principal(self, name: str, verifier: str, *, admin: bool = False,
                               stats: bool = False) -> None:
        check_principal(name)
        done = await self.pool.execute(
            "INSERT INTO principals (name, verifier, admin, stats) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (name) DO NOTHING", name, verifier, admin, stats)
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

    async def grant(self, name: str, pattern: str, access: Access | str) -> None:
        check_pattern(pattern)
        access = check_access(access)
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
            "SELECT p.name, p.verifier, p.admin, p.stats,"
            " COALESCE(array_agg(g.pattern || ':' || g.access ORDER BY g.pattern)"
            "   FILTER (WHERE g.pattern IS NOT NULL), '{}') AS grants"
            " FROM principals p LEFT JOIN grants g ON g.principal = p.name"
            " WHERE $1::text IS NULL OR p.name = $1 GROUP BY p.name ORDER BY p.name", name)
        return [PrincipalRow(r["name"], r["verifier"], r["admin"],
                             tuple(_grant(g) for g in r["grants"]), r["stats"])
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


def _grant(text: str) -> Grant:
    """``pattern:access``, as the principals query aggregates a grant."""
    pattern, access = text.rsplit(":", 1)
    return Grant(pattern, check_access(access))


def _relay(callback: Callable[[str], None]) -> Callable[..., None]:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)
    return on_notify


async def _insert_event(conn: asyncpg.Connection | PoolConnectionProxy, job_id: str | None,
                        kind: str, from_state: str | None, to_state: str | None, *,
                        duration_ms: float | None = None, bytes_moved: int | None = None,
                        detail: dict[str, Any] | None = None,
                        actor: str | None = None) -> None:
    await conn.execute(
        "INSERT INTO events (job_id, kind, from_state, to_state, duration_ms, bytes, detail,"
        " actor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        job_id, kind, from_state, to_state, duration_ms, bytes_moved, detail or {}, actor)
