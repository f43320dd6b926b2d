"""The few questions the sidecar asks its PostgreSQL, each on a short-lived connection."""

from __future__ import annotations

from typing import Any

from ..walnames import parse_lsn, parse_segment
from .policy import Position


async def switch_wal(dsn: str) -> None:
    """Finish the current WAL segment (archived next); a no-op right after a switch."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=3, server_settings={
        "application_name": "jobmesh agent pause"})
    try:
        await conn.execute("SELECT pg_switch_wal()", timeout=10)
    finally:
        await conn.close()


async def server_position(dsn: str) -> Position:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=3, server_settings={
        "application_name": "jobmesh agent position"})
    try:
        row = await conn.fetchrow("SELECT pg_walfile_name(lsn) AS wal, lsn::text AS lsn FROM"
                                  " pg_current_wal_lsn() AS lsn", timeout=3)
    finally:
        await conn.close()
    assert row is not None
    return Position(parse_segment(row["wal"]).timeline, parse_lsn(row["lsn"]))


async def wal_status(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=3, server_settings={
        "application_name": "jobmesh agent status"})
    try:
        row = await conn.fetchrow(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END::text AS lsn, last_archived_wal,"
            " last_archived_time, failed_count, last_failed_wal FROM pg_stat_archiver",
            timeout=3)
    finally:
        await conn.close()
    assert row is not None
    at = row["last_archived_time"]
    return {"current_lsn": row["lsn"], "last_archived": row["last_archived_wal"],
            "last_archived_at": at.isoformat() if at else None,
            "failed_count": row["failed_count"], "last_failed": row["last_failed_wal"]}

