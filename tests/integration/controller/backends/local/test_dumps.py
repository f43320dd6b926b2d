"""Dumps in and out of jobs on the local backend, with real PostgreSQL 15, pg_dump and pg_restore.

An export is the job's agent's dump (``POST /dump``, stored, then read back as
``jobmesh job export`` streams it); an import is a create with ``{"source":
{"dump": PATH}}``, restored as ``job_owner``. A reader is ``job_reader`` over TCP
with the job's backend password, as the router logs in. Every job is deleted by
a fixture finaliser and anything of it still running is killed, also when a test
fails; scratch databases in the shared cluster are dropped.

Over ~400 lines on purpose: the specifications of dumps in and out of a job, one
behaviour per test, sharing this module's fixtures (the backend and job fixtures
are test_backend.py's, copied: they want a home in tests/support).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from jobmesh.agent.apitoken import header, job_token
from jobmesh.agent.manifest import Manifest, job_prefix
from jobmesh.agent.postgres import Instance, bin_dir
from jobmesh.controller.backends.job_database import connect, restore_list
from jobmesh.controller.backends.local.backend import LocalBackend
from jobmesh.controller.backends.local.process import JobDir, postmaster
from jobmesh.controller.catalog.db import Catalog
from jobmesh.controller.catalog.models import Job
from jobmesh.controller.core.backend import PermanentError, Started
from tests.support.local_jobs import MakeJob, making_jobs
from tests.support.mesh import pids_mentioning
from tests.support.template_store import seed_store

pytestmark = pytest.mark.timeout(180)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dumps_root(pg_root: Path) -> Path:
    """One backend root for this module's session: the template's local copies made once."""
    root = pg_root / "local-dumps"
    root.mkdir(mode=0o755, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def dumps_store_url(pg_root: Path, template_store: Path) -> str:
    """A file:// store for the session that holds the template already."""
    path = pg_root / "local-dumps-store"
    seed_store(template_store, path)
    return f"file://{path}"


@pytest.fixture
async def backend(dumps_root: Path, dumps_store_url: str) -> AsyncIterator[LocalBackend]:
    b = LocalBackend(dumps_root, dumps_store_url, spares=0)
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def new_job(backend: LocalBackend, catalog: Catalog) -> AsyncIterator[MakeJob]:
    """Makes catalog jobs; afterwards each is deleted and whatever of it runs is killed."""
    async with making_jobs(backend, catalog, "d") as make:
        yield make



ScratchDb = Callable[[], str]


@pytest.fixture
def scratch_db(pg: Instance) -> Iterator[ScratchDb]:
    """Makes empty databases in the shared PostgreSQL 15 (initdb'd by tests/support, not
    by jobmesh); all are dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"scratch_{os.urandom(4).hex()}"
        pg.psql(f"CREATE DATABASE {name}")
        made.append(name)
        return name

    yield make
    for name in made:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def marker(pg_root: Path) -> Iterator[Path]:
    """A path a program run by the server would create (pg_root belongs to postgres)."""
    path = pg_root / f"marker-{os.urandom(4).hex()}"
    yield path
    path.unlink(missing_ok=True)


async def said(text: str) -> None:
    pass


async def connect_as(started: Started, job: Job, role: str = "job_owner",
                     **settings: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=started.host, port=started.port, user=role,
                                 password=job.backend_password, database=job.database,
                                 server_settings=settings or None)


async def owner_sql(started: Started, job: Job, sql: str) -> None:
    conn = await connect_as(started, job)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A client tool of the server's version; fails the test with its stderr."""
    proc = await asyncio.to_thread(
        subprocess.run, [str(bin_dir() / args[0]), *args[1:]], capture_output=True, text=True,
        timeout=120, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc


async def export(backend: LocalBackend, started: Started, job: Job, dest: Path) -> Path:
    """What ``jobmesh job export`` does: the agent dumps into the store, then the stored
    object is read back."""
    async with aiohttp.ClientSession() as http, \
            http.post(f"{started.agent_url}/dump",
                      headers=header(job_token(backend.agents.key, job.id))) as resp:
        assert resp.status == 200, await resp.text()
        manifest = Manifest.from_json(await resp.read())
    with dest.open("wb") as f:
        async for chunk in backend.store.get(f"{job_prefix(job.id)}{manifest.objects[0].key}"):
            f.write(chunk)
    return dest


async def dump_scratch(pg: Instance, db: str, sql: str, dest: Path) -> Path:
    """Fill a scratch database as its superuser, then plain ``pg_dump -Fc`` it."""
    pg.psql(sql, database=db)
    await run("pg_dump", "-Fc", "-f", str(dest), "-h", str(pg.socket_dir), "-p", str(pg.port),
              "-U", "postgres", db)
    return dest


FILL = """
CREATE TABLE pages (id serial PRIMARY KEY, url text NOT NULL, body text);
CREATE INDEX pages_url ON pages (lower(url));
CREATE TABLE visits (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     page_id int NOT NULL REFERENCES pages, at timestamptz NOT NULL);
CREATE INDEX visits_page ON visits (page_id, at);
INSERT INTO pages (url, body) SELECT 'https://example.com/' || g, md5(g::text)
  FROM generate_series(1, 300) g;
INSERT INTO visits (page_id, at)
  SELECT 1 + g % 300, '2024-01-01'::timestamptz + g * interval '1 min'
  FROM generate_series(1, 1000) g;
CREATE VIEW busy AS SELECT page_id, count(*) AS n FROM visits GROUP BY page_id;
CREATE FUNCTION remote_pages(dsn text) RETURNS bigint LANGUAGE sql AS
  $$ SELECT n FROM dblink(dsn, 'SELECT count(*) FROM pages') AS t(n bigint) $$;
"""

CHECKSUMS = {
    "pages": "SELECT count(*)::text || ':' || md5(string_agg(p::text, ',' ORDER BY id))"
             " FROM pages p",
    "visits": "SELECT count(*)::text || ':' || md5(string_agg(v::text, ',' ORDER BY id))"
              " FROM visits v",
    "busy": "SELECT md5(string_agg(b::text, ',' ORDER BY page_id)) FROM busy b",
}


async def checksums(started: Started, job: Job) -> dict[str, str]:
    conn = await connect_as(started, job)
    try:
        return {name: await conn.fetchval(sql) for name, sql in CHECKSUMS.items()}
    finally:
        await conn.close()


# --- export, then import -------------------------------------------------------------------


async def test_an_exported_job_imports_into_a_new_job_with_the_same_data(backend, new_job,
                                                                        tmp_path):
    a = await new_job()
    started_a = await backend.create(a, said)
    await owner_sql(started_a, a, FILL)
    path = await export(backend, started_a, a, tmp_path / "a.pgdump")

    b = await new_job({"source": {"dump": str(path)}})
    started_b = await backend.create(b, said)
    assert await checksums(started_b, b) == await checksums(started_a, a)
    conn = await connect_as(started_b, b)
    try:
        assert await conn.fetchval("SELECT nextval('pages_id_seq')") == 301
        assert await conn.fetchval("INSERT INTO visits (page_id, at) VALUES (1, now())"
                                   " RETURNING id") == 1001
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname IN ('pages_url', 'visits_page')"
            " AND relowner = 'job_owner'::regrole") == 2
        dsn = (f"host={started_b.host} port={started_b.port} dbname={b.database}"
               f" user=job_reader password={b.backend_password}")
        assert await conn.fetchval("SELECT remote_pages($1)", dsn) == 300
    finally:
        await conn.close()


async def test_a_dump_from_a_postgresql_jobmesh_did_not_make_loads(backend, new_job, pg,
                                                                   scratch_db, tmp_path):
    path = await dump_scratch(pg, scratch_db(), """
        CREATE EXTENSION dblink;
        COMMENT ON EXTENSION plpgsql IS 'changed by the source';
        COMMENT ON SCHEMA public IS 'the source''s public';
        CREATE TABLE items (id serial PRIMARY KEY, v text);
        INSERT INTO items (v) SELECT g::text FROM generate_series(1, 50) g;
        """, tmp_path / "foreign.pgdump")
    job = await new_job({"source": {"dump": str(path)}})
    started = await backend.create(job, said)
    conn = await connect_as(started, job)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 50
        assert await conn.fetchval("INSERT INTO items (v) VALUES ('x') RETURNING id") == 51
        assert await conn.fetchval("SELECT obj_description('public'::regnamespace)") == \
            "the source's public"
    finally:
        await conn.close()


async def test_a_trusted_extension_the_job_lacks_is_created_by_the_import(
        backend, new_job, pg, scratch_db, tmp_path):
    path = await dump_scratch(pg, scratch_db(), """
        CREATE EXTENSION pgcrypto;
        CREATE TABLE secrets (id int PRIMARY KEY, h bytea DEFAULT digest('x', 'sha256'));
        INSERT INTO secrets (id) VALUES (1);
        """, tmp_path / "pgcrypto.pgdump")
    job = await new_job({"source": {"dump": str(path)}})
    started = await backend.create(job, said)
    conn = await connect_as(started, job)
    try:
        assert await conn.fetchval("SELECT extowner::regrole::text FROM pg_extension"
                                   " WHERE extname = 'pgcrypto'") == "job_owner"
        assert await conn.fetchval("SELECT h = digest('x', 'sha256') FROM secrets") is True
    finally:
        await conn.close()


async def test_an_untrusted_extension_the_job_lacks_fails_the_import_in_one_line(
        backend, new_job, pg, scratch_db, tmp_path):
    path = await dump_scratch(pg, scratch_db(), "CREATE EXTENSION pageinspect",
                              tmp_path / "pageinspect.pgdump")
    job = await new_job({"source": {"dump": str(path)}})
    with pytest.raises(PermanentError) as err:
        await backend.create(job, said)
    assert "\n" not in str(err.value)
    assert 'permission denied to create extension "pageinspect"' in str(err.value)


# Each needs a superuser to restore. The function does its COPY only outside the source
# database (named scratch_*), so that making the source runs no program.
COPY_FROM_PROGRAM = """
    CREATE TABLE sink (line text);
    CREATE FUNCTION public.touch(x int) RETURNS int LANGUAGE plpgsql AS $$
    BEGIN
      IF current_database() NOT LIKE 'scratch\\_%' THEN
        EXECUTE format('COPY public.sink FROM PROGRAM %L', 'touch MARKER');
      END IF;
      RETURN x;
    END $$;
"""
NEEDS_SUPERUSER = {
    "c-function": "CREATE FUNCTION f() RETURNS int AS '$libdir/dblink', 'dblink_connect'"
                  " LANGUAGE C",
    "materialized-view": COPY_FROM_PROGRAM + "CREATE MATERIALIZED VIEW mv AS SELECT touch(1) AS y",
    "check-constraint": COPY_FROM_PROGRAM + """
        CREATE TABLE t (x int CHECK (touch(x) = x)); INSERT INTO t VALUES (1)""",
    "index-expression": COPY_FROM_PROGRAM + """
        CREATE FUNCTION public.same(x int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS
          $$ BEGIN RETURN public.touch(x); END $$;
        CREATE TABLE t (x int); INSERT INTO t VALUES (1); CREATE INDEX ON t (same(x))""",
}


@pytest.mark.parametrize("what", sorted(NEEDS_SUPERUSER))
async def test_a_dump_that_needs_a_superuser_fails_in_one_line_and_runs_nothing(
        backend, new_job, pg, scratch_db, tmp_path, marker, what):
    path = await dump_scratch(pg, scratch_db(),
                              NEEDS_SUPERUSER[what].replace("MARKER", str(marker)),
                              tmp_path / f"{what}.pgdump")
    job = await new_job({"source": {"dump": str(path)}})
    with pytest.raises(PermanentError) as err:
        await backend.create(job, said)
    message = str(err.value)
    print(f"\n{what}: {message}")
    assert "\n" not in message and message.startswith(f"cannot import {path} into job {job.id}")
    assert "permission denied for language c" in message or "external program" in message
    assert not marker.exists()
    # Given up on: its PostgreSQL is freed at once, and nothing of the attempt is kept
    # (the restore was one transaction, and a retry starts from the template again).
    jd = JobDir(backend.root, job.id)
    assert postmaster(jd) is None and not jd.path.exists()
    assert pids_mentioning(str(jd.path)) == []


async def test_a_file_that_is_not_a_dump_fails_at_once_as_permanent(backend, new_job,
                                                                    tmp_path):
    path = tmp_path / "notes.pgdump"
    path.write_text("id,v\n1,x\n")
    job = await new_job({"source": {"dump": str(path)}})
    with pytest.raises(PermanentError) as err:
        await backend.create(job, said)
    assert "\n" not in str(err.value) and "valid archive" in str(err.value)


def test_the_restore_list_leaves_out_only_the_extensions_the_job_has_and_the_owner_cannot_own():
    toc = "\n".join([
        ";     dbname: src",
        "2; 3079 16389 EXTENSION - dblink ",
        "3408; 0 0 COMMENT - EXTENSION dblink ",
        "1; 3079 12345 EXTENSION - plpgsql ",           # as pg_dump before 9.x wrote it
        "3400; 0 0 COMMENT - EXTENSION plpgsql postgres",
        "4; 3079 16500 EXTENSION - pgcrypto ",
        "3401; 0 0 COMMENT - EXTENSION pgcrypto ",
        '3402; 0 0 COMMENT - EXTENSION "Odd""Name" ',
        "3403; 0 0 COMMENT - SCHEMA public pg_database_owner",
        "218; 1259 16443 TABLE public dblink postgres",
        "219; 0 16443 TABLE DATA public dblink postgres",
        "",
    ])
    kept, dropped = restore_list(toc, {"dblink", "plpgsql", "postgres_fdw", 'Odd"Name'})
    assert [line.split(";")[0] for line in dropped] == ["2", "3408", "1", "3400", "3402"]
    assert [line.split(";")[0] for line in kept.splitlines()] == [
        "", "4", "3401", "3403", "218", "219"]


# --- the reader ----------------------------------------------------------------------------


def reader_env(job: Job) -> dict[str, str]:
    return {"PGPASSWORD": job.backend_password}


async def test_the_reader_can_pg_dump_a_job_with_serial_columns(backend, new_job, pg, scratch_db,
                                                                tmp_path):
    job = await new_job()
    started = await backend.create(job, said)
    await owner_sql(started, job, FILL)
    path = tmp_path / "by-reader.pgdump"
    await run("pg_dump", "-Fc", "-f", str(path), "-h", started.host, "-p", str(started.port),
              "-U", "job_reader", "--no-password", job.database, env=reader_env(job))
    db = scratch_db()
    await run("pg_restore", "--single-transaction", "--exit-on-error", "--no-owner",
              "--no-privileges", "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", "postgres",
              "-d", db, str(path))
    assert pg.psql("SELECT count(*) FROM pages", database=db) == "300"
    assert pg.psql("SELECT nextval('visits_id_seq')", database=db) == "1001"
    described = await run("psql", "-X", "-h", started.host, "-p", str(started.port),
                          "-U", "job_reader", "-d", job.database, "-c", r"\d+ pages",
                          "-c", r"\ds+", env=reader_env(job))
    assert "pages_id_seq" in described.stdout and "visits_id_seq" in described.stdout
    reader = await connect_as(started, job, "job_reader")
    try:
        # Identity columns' sequences are not in information_schema.sequences, for anyone.
        assert await reader.fetchval(
            "SELECT string_agg(sequence_name, ',' ORDER BY sequence_name)"
            " FROM information_schema.sequences") == "pages_id_seq"
        assert await reader.fetchval(
            "SELECT string_agg(column_name, ',' ORDER BY table_name)"
            " FROM information_schema.columns WHERE is_identity = 'YES'") == "id"
        assert await reader.fetchval(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_name = 'pages' AND column_name = 'id'") == \
            "nextval('pages_id_seq'::regclass)"
    finally:
        await reader.close()


async def test_a_reader_dumps_only_the_rows_row_level_security_shows_it(backend, new_job,
                                                                       tmp_path):
    job = await new_job()
    started = await backend.create(job, said)
    await owner_sql(started, job, """
        CREATE TABLE notes (id serial PRIMARY KEY, shared bool NOT NULL, body text);
        INSERT INTO notes (shared, body) SELECT g % 3 = 0, 'note ' || g
          FROM generate_series(1, 30) g;
        ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
        CREATE POLICY readers_see_shared ON notes FOR SELECT TO job_reader USING (shared);
        """)
    path = tmp_path / "shared.pgdump"
    args = ["pg_dump", "-Fc", "-f", str(path), "-h", started.host, "-p", str(started.port),
            "-U", "job_reader", "--no-password", job.database]
    refused = await asyncio.to_thread(
        subprocess.run, [str(bin_dir() / args[0]), *args[1:]], capture_output=True, text=True,
        timeout=120, env={**os.environ, **reader_env(job)})
    assert refused.returncode != 0 and "row-level security" in refused.stderr
    await run(*args, "--enable-row-security", env=reader_env(job))
    copy = await new_job({"source": {"dump": str(path)}})  # its policy names job_reader
    conn = await connect_as(await backend.create(copy, said), copy)
    try:
        assert await conn.fetchval("SELECT count(*) || ':' || bool_and(shared) FROM notes"
                                   ) == "10:true"
    finally:
        await conn.close()


# How a reader may try to turn read-only transactions off: neither gives it a write.
READ_WRITE = {
    "set": ("SET default_transaction_read_only = off", {}),
    "startup-option": ("", {"default_transaction_read_only": "off"}),
}


@pytest.mark.parametrize("how", sorted(READ_WRITE))
async def test_the_reader_cannot_write_tables_temp_tables_or_large_objects(backend, new_job,
                                                                           how):
    job = await new_job()
    started = await backend.create(job, said)
    await owner_sql(started, job, FILL)
    owner = await connect_as(started, job)
    try:
        lo = await owner.fetchval("SELECT lo_from_bytea(0, 'the owner''s')")
    finally:
        await owner.close()
    sql, settings = READ_WRITE[how]
    reader = await connect_as(started, job, "job_reader", **settings)
    try:
        if sql:
            await reader.execute(sql)
        assert await reader.fetchval("SHOW transaction_read_only") == "off"
        for statement in (
                "INSERT INTO pages (url) VALUES ('x')", "UPDATE pages SET body = ''",
                "DELETE FROM visits", "SELECT nextval('pages_id_seq')",
                "SELECT setval('visits_id_seq', 1)", "CREATE TABLE mine (x int)",
                "CREATE TEMP TABLE mine (x int)", "CREATE TEMP VIEW mine AS SELECT 1",
                "SELECT lo_create(0)", "SELECT lo_creat(-1)", "SELECT lo_from_bytea(0, 'x')",
                "SELECT lo_import('/etc/hostname')", f"SELECT lo_put({lo}, 0, 'x')",
                f"SELECT lo_unlink({lo})", "SELECT lo_export(0, '/tmp/x')",
                f"SELECT lowrite(lo_open({lo}, x'20000'::int), 'x')"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(statement)
        assert await reader.fetchval("SELECT count(*) FROM pages") == 300
    finally:
        await reader.close()
    owner = await connect_as(started, job)
    try:
        assert await owner.fetchval("SELECT convert_from(lo_get($1), 'UTF8')", lo) == \
            "the owner's"
        assert await owner.fetchval("SELECT count(*) FROM pg_largeobject_metadata") == 1
    finally:
        await owner.close()



async def test_a_job_made_before_the_readers_privileges_changed_gets_them_at_its_next_start(
        backend, new_job, tmp_path):
    job = await new_job()
    started = await backend.create(job, said)
    await owner_sql(started, job, FILL)
    jd = JobDir(backend.root, job.id)
    # As an older template made it: the reader may create temp tables and large objects,
    # and cannot read sequences.
    su = await connect(jd.run, started.port, database=job.database)
    try:
        await su.execute(
            f"GRANT TEMPORARY ON DATABASE \"{job.database}\" TO job_reader;"
            " GRANT EXECUTE ON FUNCTION lo_create(oid) TO PUBLIC;"
            " REVOKE SELECT ON ALL SEQUENCES IN SCHEMA public FROM job_reader")
    finally:
        await su.close()
    paused = await backend.pause(job)
    assert paused.manifest.kind == "pause"
    started = await backend.resume(job, said)
    reader = await connect_as(started, job, "job_reader", default_transaction_read_only="off")
    try:
        for statement in ("CREATE TEMP TABLE mine (x int)", "SELECT lo_create(0)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(statement)
        assert await reader.fetchval("SELECT last_value FROM pages_id_seq") == 300
    finally:
        await reader.close()
    await run("pg_dump", "-Fc", "-f", str(tmp_path / "after.pgdump"), "-h", started.host,
              "-p", str(started.port), "-U", "job_reader", "--no-password", job.database,
              env=reader_env(job))
