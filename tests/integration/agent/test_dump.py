"""Logical dumps: pg_dump -Fc into the store and back, verified, against real stores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from jobmesh.agent.dump import dump, load, parse_dump_header
from jobmesh.agent.errors import AgentError
from jobmesh.agent.manifest import Manifest, dump_data_key, dump_manifest_key
from jobmesh.agent.postgres import Instance, bin_dir, free_port
from jobmesh.agent.store import get_bytes, open_store, put_bytes
from tests.support.postgres import SUPERUSER_PASSWORD

pytestmark = pytest.mark.timeout(300)

EXTRA_SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed (
    id bigserial PRIMARY KEY,
    doc jsonb NOT NULL,
    amount numeric(20, 6),
    at timestamptz DEFAULT now(),
    blob bytea,
    tags text[],
    uid uuid,
    feeling mood,
    note text
);
INSERT INTO typed (doc, amount, blob, tags, uid, feeling, note)
SELECT jsonb_build_object('n', g, 'nested', jsonb_build_array(g, 'x')),
       g * 1.000001, decode(md5(g::text), 'hex'), ARRAY['a' || g, 'b'],
       md5(g::text)::uuid, (ARRAY['sad', 'ok', 'happy'])[1 + g % 3]::mood,
       CASE WHEN g % 7 = 0 THEN NULL ELSE 'zürich ☃ ' || g END
FROM generate_series(1, 5000) g;
CREATE TABLE empty_one (a int);
CREATE INDEX typed_doc ON typed USING gin (doc);
CREATE VIEW happy AS SELECT id FROM typed WHERE feeling = 'happy';
SELECT lo_from_bytea(0, 'a large object');
"""


def _dsn(inst: Instance, db: str) -> str:
    return (f"host=127.0.0.1 port={inst.port} user=postgres password={SUPERUSER_PASSWORD} "
            f"dbname={db}")


def table_checksums(dsn: str) -> dict[str, tuple[int, str]]:
    """Row count and md5 over the sorted rows of every table; plus large objects."""
    out: dict[str, tuple[int, str]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT quote_ident(relname) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE nspname = 'public' AND relkind = 'r'")]
        for t in tables:
            count, digest = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) "
                f"FROM {t} x").fetchone()
            out[t] = (count, digest)
        out["<large objects>"] = conn.execute(
            "SELECT count(*), md5(coalesce(string_agg(encode(lo_get(oid), 'hex'), '|' "
            "ORDER BY oid), '')) FROM pg_largeobject_metadata").fetchone()
        out["<sequence>"] = (conn.execute("SELECT last_value FROM typed_id_seq").fetchone()[0],
                             "")
    return out


@pytest.fixture(scope="module")
def pgsrv(pg_factory) -> Instance:
    """One Postgres with a source database: pgbench tables plus a table of many types."""
    inst = pg_factory(f"dump-{os.urandom(3).hex()}", databases=("src",))
    subprocess.run([str(bin_dir() / "pgbench"), "-i", "-s", "1", "-q", _dsn(inst, "src")],
                   check=True, capture_output=True, env={**os.environ, "PGPASSWORD": "pw"})
    with psycopg.connect(_dsn(inst, "src"), autocommit=True) as conn:
        conn.execute(EXTRA_SCHEMA)
    return inst


@pytest.fixture
def empty_db(pgsrv: Instance) -> Iterator[str]:
    name = f"target_{os.urandom(3).hex()}"
    pgsrv.psql(f"CREATE DATABASE {name}")
    yield _dsn(pgsrv, name)
    pgsrv.psql(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.create_bucket(f"dump-{os.urandom(4).hex()}")
    return f"s3://{bucket}/prefix"


def _tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE nspname = 'public'")]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobmesh", "agent", *args],
                          capture_output=True, text=True, timeout=120)


async def test_dump_then_load_gives_identical_tables(pgsrv, empty_db, store_url):
    store = open_store(store_url)
    try:
        man = await dump(_dsn(pgsrv, "src"), store, "j1")
        loaded = await load(empty_db, store, "j1")
    finally:
        await store.close()
    assert loaded == man
    assert man.kind == "dump" and man.pg_version.startswith("15")
    assert man.extra["database"] == "src"
    before = table_checksums(_dsn(pgsrv, "src"))
    assert before["pgbench_accounts"][0] == 100_000 and before["typed"][0] == 5000
    assert table_checksums(empty_db) == before


async def test_dump_manifest_is_written_last_and_describes_the_object(pgsrv, store_url):
    store = open_store(store_url)
    try:
        man = await dump(_dsn(pgsrv, "src"), store, "j2")
        keys = [o.key for o in await store.list("j2/")]
        assert keys == sorted([dump_data_key("j2", man.id), dump_manifest_key("j2", man.id)])
        stored = Manifest.from_json(await get_bytes(store, dump_manifest_key("j2", man.id)))
        data = await get_bytes(store, dump_data_key("j2", man.id))
    finally:
        await store.close()
    assert stored == man
    [entry] = man.objects
    assert entry.key == f"dumps/{man.id}.pgdump" and entry.size == len(data)
    assert data.startswith(b"PGDMP")


async def test_load_picks_the_newest_dump_unless_told(pgsrv, empty_db, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    src = _dsn(pgsrv, "src")
    first = await dump(src, store, "j")
    with psycopg.connect(src, autocommit=True) as conn:
        conn.execute("CREATE TABLE added_later (x int)")
    try:
        second = await dump(src, store, "j")
        assert (await load(empty_db, store, "j", dump_id=first.id)).id == first.id
        assert "added_later" not in _tables(empty_db)
    finally:
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("DROP TABLE added_later")
    other = empty_db.rsplit("=", 1)[0] + "=postgres"
    with psycopg.connect(other, autocommit=True) as conn:
        conn.execute("CREATE DATABASE newest_target")
    try:
        target = empty_db.rsplit("=", 1)[0] + "=newest_target"
        assert (await load(target, store, "j")).id == second.id
        assert "added_later" in _tables(target)
    finally:
        with psycopg.connect(other, autocommit=True) as conn:
            conn.execute("DROP DATABASE newest_target WITH (FORCE)")


async def test_a_corrupted_dump_object_is_refused_and_nothing_is_loaded(
        pgsrv, empty_db, store_url):
    store = open_store(store_url)
    try:
        man = await dump(_dsn(pgsrv, "src"), store, "jc")
        key = dump_data_key("jc", man.id)
        data = bytearray(await get_bytes(store, key))
        data[len(data) // 2] ^= 0xFF
        await put_bytes(store, key, bytes(data))
        with pytest.raises(AgentError, match=f"dump object {key} is corrupt"):
            await load(empty_db, store, "jc")
    finally:
        await store.close()
    assert _tables(empty_db) == []


async def test_a_dump_that_pg_restore_would_accept_is_still_refused_on_a_hash_mismatch(
        pgsrv, empty_db, tmp_path):
    """The object is a valid archive, only its manifest disagrees: the transaction must not
    commit, because the last bytes reach pg_restore only after the hash matched."""
    store = open_store(f"file://{tmp_path}/store")
    man = await dump(_dsn(pgsrv, "src"), store, "jm")
    entry = man.objects[0]
    forged = Manifest(**{**man.__dict__, "objects": [
        type(entry)(entry.key, entry.size, "0" * 64)]})
    await put_bytes(store, dump_manifest_key("jm", man.id), forged.to_json())
    with pytest.raises(AgentError, match="is corrupt"):
        await load(empty_db, store, "jm")
    assert _tables(empty_db) == []


def test_dump_and_load_from_the_command_line(pgsrv, empty_db, store_url):
    dumped = _cli("dump", "--dsn", _dsn(pgsrv, "src"), "--store", store_url, "--job", "cli")
    assert dumped.returncode == 0, dumped.stderr
    dump_id = dumped.stdout.strip()
    loaded = _cli("load", "--dsn", empty_db, "--store", store_url, "--job", "cli",
                  "--dump", dump_id)
    assert loaded.returncode == 0, loaded.stderr
    assert table_checksums(empty_db) == table_checksums(_dsn(pgsrv, "src"))


def test_bad_dsn_is_one_line_and_leaves_no_object(tmp_path):
    url = f"file://{tmp_path}/store"
    proc = _cli("dump", "--dsn", f"host=127.0.0.1 port={free_port()} user=postgres",
                "--store", url, "--job", "j")
    assert proc.returncode == 1
    assert proc.stderr.startswith("jobmesh agent dump: pg_dump failed: connection to server")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


def test_unknown_dump_id_is_one_line(pgsrv, empty_db, tmp_path):
    url = f"file://{tmp_path}/store"
    assert _cli("dump", "--dsn", _dsn(pgsrv, "src"), "--store", url, "--job", "j"
                ).returncode == 0
    proc = _cli("load", "--dsn", empty_db, "--store", url, "--job", "j", "--dump", "nope")
    assert proc.returncode == 1
    assert proc.stderr.startswith("jobmesh agent load: no dump 'nope' of job 'j'")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_load_without_any_dump_is_one_line(empty_db, tmp_path):
    proc = _cli("load", "--dsn", empty_db, "--store", f"file://{tmp_path}/s", "--job", "none")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"jobmesh agent load: no dumps of job 'none' in "
                                   f"file://{tmp_path}/s")


def test_dump_header_parses_the_source_versions():
    # A hand-built 1.14 header (PostgreSQL 15): ints are a sign byte plus 4 little-endian bytes.
    def i(n: int) -> bytes:
        return b"\x00" + n.to_bytes(4, "little")

    def s(text: str) -> bytes:
        return i(len(text)) + text.encode()

    head = (b"PGDMP" + bytes([1, 14, 0, 4, 8, 1]) + i(-1 & 0) + b"".join(i(n) for n in range(7))
            + s("src") + s("15.8") + s("15.8"))
    h = parse_dump_header(head)
    assert h is not None and (h.database, h.server_version) == ("src", "15.8")
    assert parse_dump_header(b"not a dump") is None
    assert parse_dump_header(head[:20]) is None


async def test_a_load_that_fails_midway_rolls_back_everything(pgsrv, empty_db, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    await dump(_dsn(pgsrv, "src"), store, "jf")
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE typed (x int)")  # collides with a table late in the dump
    with pytest.raises(AgentError, match=r'^pg_restore failed: .*"typed" already exists'):
        await load(empty_db, store, "jf")
    assert _tables(empty_db) == ["typed"]
