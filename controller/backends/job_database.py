"""Making a started instance the job's: its database name, its roles' passwords, its data.

All of it runs as the superuser over the job's private Unix socket. Passwords
are sent as SCRAM verifiers computed here, as ``psql``'s ``\\password`` does,
so the cleartext never reaches the server (or its log, should a statement
fail). Utility statements take no parameters: names and literals in them are
quoted here, for any content.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from jobmesh.agent.init import OWNER_ROLE, READER_ROLE
from jobmesh.agent.postgres import bin_dir

from ..catalog.passwords import scram_verifier
from ..core.backend import BackendError

_STDERR_LINES = 50


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A string literal that means ``value`` whatever standard_conforming_strings says."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


async def connect(run_dir: Path, port: int, *, database: str = "postgres",
                  user: str = "postgres", timeout: float = 10) -> asyncpg.Connection:
    # Without waiting for WAL flushes: what the controller writes (a database name,
    # passwords, grants) is written again by the next setup if a crash lost it, and the
    # flush is most of the time a create spends in these statements.
    return await asyncpg.connect(host=str(run_dir), port=port, user=user, database=database,
                                 timeout=timeout,
                                 server_settings={"application_name": "jobmesh controller",
                                                  "synchronous_commit": "off"})


async def wait_until_writable(conn: asyncpg.Connection, timeout: float) -> None:
    """Until archive recovery has ended (the server left hot standby and was promoted)."""
    deadline = time.monotonic() + timeout
    while await conn.fetchval("SELECT pg_is_in_recovery()"):
        if time.monotonic() > deadline:
            raise BackendError(f"PostgreSQL was still replaying WAL after {timeout:g} s")
        await asyncio.sleep(0.05)


async def personalise(conn: asyncpg.Connection, job_id: str, template_db: str,
                      password: str) -> None:
    """Name the database ``job_<id>`` and let the job's roles log in with ``password``.

    One round trip and one commit (a multi-statement query is one transaction).
    Idempotent: a database already renamed stays; passwords are set every time (that
    is also how a new backend password reaches a job that was paused meanwhile).
    """
    job_db = f"job_{job_id}"
    found = {r["datname"] for r in await conn.fetch(
        "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", [template_db, job_db])}
    statements = []
    if job_db not in found:
        if template_db not in found:
            raise BackendError(f"neither {job_db} nor the template's {template_db} exists")
        statements.append(
            f"ALTER DATABASE {quote_ident(template_db)} RENAME TO {quote_ident(job_db)}")
    verifier = quote_literal(scram_verifier(password))
    statements += [f"ALTER ROLE {quote_ident(role)} LOGIN PASSWORD {verifier}"
                   for role in (OWNER_ROLE, READER_ROLE)]
    await conn.execute("; ".join(statements))


async def import_dump(run_dir: Path, port: int, job_id: str, path: Path,
                      progress: Callable[[str], Awaitable[None]]) -> int:
    """Load a ``pg_dump -Fc`` file into the job's (new) database, in one transaction.

    It runs as ``job_owner``, so everything it creates belongs to the job's owner;
    ownership and grants from the source database are skipped (their roles do not
    exist here), and the reader gets SELECT on every table in every schema. Returns
    the size of the file.
    """
    try:
        size = (await asyncio.to_thread(path.stat)).st_size
    except OSError as exc:
        raise BackendError(f"cannot import {path} into job {job_id}: {exc.strerror}") from exc
    await progress(f"importing {path.name} ({size / 1e6:,.1f} MB)")
    proc = await asyncio.create_subprocess_exec(
        str(bin_dir() / "pg_restore"), "--single-transaction", "--exit-on-error",
        "--no-owner", "--no-privileges", "--no-password", "--host", str(run_dir),
        "--port", str(port), "--username", OWNER_ROLE, "--dbname", f"job_{job_id}", str(path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise BackendError(f"cannot import {path} into job {job_id}: "
                           f"{_tool_error(err.decode('utf-8', 'replace'), proc.returncode)}")
    conn = await connect(run_dir, port, database=f"job_{job_id}")
    try:
        await grant_reader_everywhere(conn)
    finally:
        await conn.close()
    return size


async def grant_reader_everywhere(conn: asyncpg.Connection) -> None:
    """The template grants the reader SELECT in schema public; an import may bring others."""
    schemas = [r["nspname"] for r in await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
        " AND nspname <> 'information_schema'")]
    owner, reader = quote_ident(OWNER_ROLE), quote_ident(READER_ROLE)
    for schema in schemas:
        s = quote_ident(schema)
        await conn.execute(
            f"GRANT USAGE ON SCHEMA {s} TO {reader};"
            f" GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {reader};"
            f" ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {s}"
            f" GRANT SELECT ON TABLES TO {reader}")


def _tool_error(stderr: str, returncode: int | None) -> str:
    """pg_restore's first error line, without its prefix."""
    lines = [ln.strip() for ln in stderr.splitlines()[:_STDERR_LINES] if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    line = (errors or lines or [f"pg_restore exit status {returncode}"])[0]
    for prefix in ("pg_restore: error: ", "pg_restore: "):
        line = line.removeprefix(prefix)
    return line
