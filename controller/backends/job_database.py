"""Making a started instance the job's: its database name, its roles' passwords, its data.

All of it runs as the superuser over the job's private Unix socket. Passwords
are sent as SCRAM verifiers computed here, as ``psql``'s ``\\password`` does,
so the cleartext never reaches the server (or its log, should a statement
fail). Utility statements take no parameters: names and literals in them are
quoted here, for any content.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from jobmesh.agent.init import LARGE_OBJECT_CREATORS, OWNER_ROLE, READER_ROLE, reader_grants
from jobmesh.agent.postgres import bin_dir

from ..catalog.passwords import scram_verifier
from ..core.backend import BackendError, PermanentError

_STDERR_LINES = 50
_TOC_LINE = re.compile(r"^\d+; \d+ \d+ (?P<rest>.*)$")

# In pg_restore's first error when the server or the machine failed rather than the dump:
# the connection broke (the server crashed or was stopped) or something ran out.
_NOT_THE_DUMP = ("connection to server", "server closed the connection",
                 "no connection to the server", "terminating connection", "FATAL:",
                 "out of memory", "out of shared memory", "No space left on device",
                 "could not extend file", "too many connections")


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
                      password: str) -> bool:
    """Name the database ``job_<id>`` and let the job's roles log in with ``password``.

    One round trip and one commit (a multi-statement query is one transaction).
    Idempotent: a database already renamed stays; passwords are set every time (that
    is also how a new backend password reaches a job that was paused meanwhile).
    Returns True when the job's database predates the reader's current privileges (its
    reader may create temporary tables): then call :func:`upgrade_reader`.
    """
    job_db = f"job_{job_id}"
    rows = await conn.fetch(
        "SELECT datname, has_database_privilege($2, oid, 'TEMPORARY') AS temp"
        " FROM pg_database WHERE datname = ANY($1::text[])", [template_db, job_db], READER_ROLE)
    found = {r["datname"]: r["temp"] for r in rows}
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
    return bool(found.get(job_db, found.get(template_db)))


async def upgrade_reader(run_dir: Path, port: int, job_id: str) -> None:
    """Give the reader of a job made before its privileges changed what a new job's has
    (``agent/init.py``): SELECT on sequences, no TEMPORARY, no large-object creation.
    Run once per such job, at its next start; then :func:`personalise` says no more."""
    conn = await connect(run_dir, port, database=f"job_{job_id}")
    try:
        creators = ", ".join(LARGE_OBJECT_CREATORS)
        owner, reader = quote_ident(OWNER_ROLE), quote_ident(READER_ROLE)
        async with conn.transaction():
            await grant_reader_everywhere(conn)
            await conn.execute(
                f"REVOKE EXECUTE ON FUNCTION {creators} FROM PUBLIC;"
                f" GRANT EXECUTE ON FUNCTION {creators} TO {owner};"
                f" REVOKE TEMPORARY ON DATABASE {quote_ident(f'job_{job_id}')}"
                f" FROM PUBLIC, {reader}")
    finally:
        await conn.close()


async def import_dump(run_dir: Path, port: int, job_id: str, path: Path,
                      progress: Callable[[str], Awaitable[None]]) -> int:
    """Load a ``pg_dump -Fc`` file into the job's (new) database, in one transaction.

    It runs as ``job_owner``, never as a superuser (a dump is user input), so everything
    it creates belongs to the job's owner, and whatever in it needs a superuser (a C
    function, a ``COPY ... FROM PROGRAM`` that runs during the restore) fails the import.
    Ownership and grants from the source database are skipped (their roles do not exist
    here), and so are the extensions the job's database already has (see
    ``restore_list``); the reader gets SELECT on every table and sequence in every
    schema. Returns the size of the file. Raises PermanentError when the dump does not
    load (not an archive, or a statement in it fails), BackendError when retrying may help.
    """
    try:
        size = (await asyncio.to_thread(path.stat)).st_size
    except OSError as exc:
        raise BackendError(f"cannot import {path} into job {job_id}: {exc.strerror}") from exc
    await progress(f"importing {path.name} ({size / 1e6:,.1f} MB)")
    code, toc, err = await _run("pg_restore", "--list", str(path))
    if code != 0:  # nothing but the file was involved: it is not an archive pg_restore reads
        raise PermanentError(f"cannot import {path} into job {job_id}: "
                             f"{_tool_error(err, code)}")
    conn = await connect(run_dir, port, database=f"job_{job_id}")
    try:
        theirs = {r["extname"] for r in await conn.fetch(
            "SELECT extname FROM pg_extension WHERE NOT pg_has_role($1, extowner, 'USAGE')",
            OWNER_ROLE)}
        wanted, _ = restore_list(toc, theirs)
        with tempfile.TemporaryDirectory(prefix="jobmesh-import-") as scratch:
            listfile = Path(scratch) / "restore.list"
            await asyncio.to_thread(listfile.write_text, wanted)
            code, _, err = await _run(
                "pg_restore", "--single-transaction", "--exit-on-error", "--no-owner",
                "--no-privileges", "--no-password", "--use-list", str(listfile),
                "--host", str(run_dir), "--port", str(port), "--username", OWNER_ROLE,
                "--dbname", f"job_{job_id}", str(path))
        if code != 0:
            error = PermanentError if _dump_does_not_load(err, code) else BackendError
            raise error(f"cannot import {path} into job {job_id}: {_tool_error(err, code)}")
        await grant_reader_everywhere(conn)
    finally:
        await conn.close()
    return size


def restore_list(toc: str, theirs: set[str]) -> tuple[str, list[str]]:
    """The archive's table of contents (``pg_restore --list``) to restore, and what it left out.

    Left out: creating an extension the job's database already has that ``job_owner``
    does not own (``theirs``: the template's dblink, postgres_fdw and plpgsql, made by the
    superuser), and comments on it, which only its owner may set (restoring them as the
    owner failed every import with "must be owner of extension dblink"). An extension the
    job lacks stays: the owner can create a trusted one, and an untrusted one fails the
    import with PostgreSQL's own "permission denied to create extension". Schema public
    needs nothing: pg_restore never creates it, and the job's owner owns it (through
    pg_database_owner), so its comment loads.

    A line is ``<id>; <catalog oid> <oid> <kind> <schema> <name> <owner>``, and only its
    id counts for ``--use-list``. An extension's line is ``EXTENSION - <name> <owner>``,
    its comment's ``COMMENT - EXTENSION <name, quoted if needed> <owner>``.
    """
    kept, dropped = [], []
    for line in toc.splitlines(keepends=True):
        m = _TOC_LINE.match(line.rstrip("\n"))
        name = None
        if m is not None:
            for kind in ("EXTENSION - ", "COMMENT - EXTENSION "):
                if m["rest"].startswith(kind):
                    tag, _, owner = m["rest"][len(kind):].rpartition(" ")
                    name = _unquote(tag or owner)
        if name is not None and name in theirs:
            dropped.append(line.rstrip("\n"))
        else:
            kept.append(line)
    return "".join(kept), dropped


def _dump_does_not_load(stderr: str, returncode: int | None) -> bool:
    """Whether pg_restore failed because of the dump (a statement in it failed, its data
    is damaged), so that trying again would fail again."""
    if returncode is None or returncode < 0:  # killed: by whom is not the dump's business
        return False
    first = next(iter(_from_first_error(stderr)), "")
    return not any(text in first for text in _NOT_THE_DUMP)


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return name[1:-1].replace('""', '"')
    return name


async def _run(tool: str, *args: str) -> tuple[int | None, str, str]:
    """Run a client tool of the server's version: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(bin_dir() / tool), *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def grant_reader_everywhere(conn: asyncpg.Connection) -> None:
    """The template grants the reader SELECT in schema public; an import may bring others."""
    schemas = [r["nspname"] for r in await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
        " AND nspname <> 'information_schema'")]
    if schemas:
        await conn.execute("; ".join(reader_grants(schema) for schema in schemas))


def _from_first_error(stderr: str) -> list[str]:
    """pg_restore's stderr lines from its first error on (all of them if none is one)."""
    lines = [ln.strip() for ln in stderr.splitlines()[:_STDERR_LINES] if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if "error:" in ln), 0)
    return lines[first:]


def _tool_error(stderr: str, returncode: int | None) -> str:
    """pg_restore's first error as one line: PostgreSQL's message, its hint, and the
    first line of the statement that failed."""
    lines = _from_first_error(stderr)
    if not lines:
        return f"pg_restore exit status {returncode}"
    line = lines[0]
    for prefix in ("pg_restore: error: ", "pg_restore: "):
        line = line.removeprefix(prefix)
    line = re.sub(r"\bERROR: +", "", line.removeprefix("could not execute query: "))
    for more in lines[1:]:
        if more.startswith("pg_restore:"):
            break
        if more.startswith("HINT:"):
            line += f" (hint: {more.removeprefix('HINT:').strip()})"
        elif more.startswith("Command was:"):
            line += f"; in: {more.removeprefix('Command was:').strip()}"
            break
    return line
