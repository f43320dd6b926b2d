"""The catalog's schema: the ``NNNN_name.sql`` files in ``migrations/``, applied in order.

Each file runs once, in its own transaction, and is recorded in
``schema_migrations``; an advisory lock lets one migrator work at a time, so
controllers starting together (several replicas, a restart) apply each file
once.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x6A6F626D657368  # "jobmesh": one migrator at a time


def migrations() -> list[tuple[int, Path]]:
    """``NNNN_name.sql`` files in ``migrations/``, by version."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        prefix = path.name.split("_", 1)[0]
        if prefix.isdigit():
            found.append((int(prefix), path))
    return found


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the migrations not yet applied, in order; returns their versions."""
    applied: list[int] = []
    async with pool.acquire() as conn:
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
