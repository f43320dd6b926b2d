"""Restore: round trips through both stores, verification with fallback, and CLI errors.

A restore counts only if the restored cluster starts and every table has
the same contents as before the snapshot (row counts and an md5 over all
rows in key order).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shlex
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobmesh.agent.basebackup import take_base_backup
from jobmesh.agent.errors import AgentError
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.manifest import Manifest, ObjectEntry
from jobmesh.agent.postgres import Instance, conf_quote, free_port, os_user
from jobmesh.agent.restore import (
    backup_end_time,
    parse_target_time,
    recovery_settings,
    restore,
)
from jobmesh.agent.snapshot import take_snapshot
from jobmesh.agent.store import Store
from jobmesh.agent.wal import Archiver
from tests.support.clusters import agent, checksums, cluster, fill, start_restored, unique
from tests.support.postgres import PgFactory
from tests.support.s3 import S3Server
from tests.support.snapshot_objects import object_only_in
from tests.support.stores import StoreSpec, new_store_spec


async def test_round_trip_restores_every_table(pg_factory: PgFactory, store_spec: StoreSpec,
                                               store: Store, pg_root: Path,
                                               restored_instances: list[Instance]) -> None:
    inst = cluster(pg_factory, "roundtrip")
    fill(inst, rows=5000)
    inst.psql("update pgbench_accounts set abalance = aid % 97 where aid % 3 = 0",
              database="job_alpha")
    before = checksums(inst)
    inst.stop()
    m = await take_snapshot(inst.datadir, store, "rt")

    dest = pg_root / unique("roundtrip-restored")
    result = await restore(dest, store, "rt", s3_endpoint=store_spec.endpoint)
    assert (result.manifest.id, result.skipped, result.recovery_configured) == (m.id, [], False)
    restored = start_restored(dest, restored_instances)
    assert checksums(restored) == before
    assert before["known"].startswith("5000:")
    assert not (dest / "recovery.signal").exists()


async def test_cli_round_trip_prints_the_snapshot_id(pg_factory: PgFactory, file_store: StoreSpec,
                                                     pg_root: Path,
                                                     restored_instances: list[Instance]) -> None:
    inst = cluster(pg_factory, "cli-rt")
    fill(inst, rows=10)
    before = checksums(inst)
    inst.stop()
    snap = agent("snapshot", "--pgdata", str(inst.datadir), *file_store.cli_args("c1"), check=True)
    sid = snap.stdout.strip()
    dest = pg_root / unique("cli-rt-restored")
    out = agent("restore", "--pgdata", str(dest), "--from", sid, *file_store.cli_args("c1"),
                check=True)
    assert sid in out.stdout
    assert checksums(start_restored(dest, restored_instances)) == before


# --- verification ---------------------------------------------------------------------------


def name_prefix(key: str) -> str:
    """How an error names a damaged object: the start of its name."""
    return key.rsplit("/", 1)[-1][:16]


@pytest.fixture
def two_snapshots(pg_factory: PgFactory, file_store: StoreSpec) -> tuple[Instance, list[str],
                                                                         list[dict[str, str]]]:
    """Job ``fb`` with two pause snapshots of different contents (old, new)."""
    inst = cluster(pg_factory, "fallback")
    fill(inst, rows=100, tag="old")
    sums = [checksums(inst)]
    inst.stop()
    ids = [agent("snapshot", "--pgdata", str(inst.datadir), *file_store.cli_args("fb"),
                 check=True).stdout.strip()]
    inst.start()
    inst.psql("update known set tag = 'new'", database="job_alpha")
    sums.append(checksums(inst))
    inst.stop()
    ids.append(agent("snapshot", "--pgdata", str(inst.datadir), *file_store.cli_args("fb"),
                     check=True).stdout.strip())
    assert sums[0] != sums[1]
    return inst, ids, sums


def test_restore_latest_skips_a_corrupt_snapshot_and_names_the_object(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        pg_root: Path, restored_instances: list[Instance]) -> None:
    _inst, (old, new), (old_sums, _new_sums) = two_snapshots
    bad_key = object_only_in(file_store.read_manifest("fb", new),
                             file_store.read_manifest("fb", old))
    file_store.corrupt(bad_key)

    dest = pg_root / unique("fallback-restored")
    proc = agent("restore", "--pgdata", str(dest), "--from", "latest",
                 *file_store.cli_args("fb"), check=True)
    assert f"skipping snapshot {new}" in proc.stderr and "damaged" in proc.stderr
    assert name_prefix(bad_key) in proc.stderr
    assert f"restored pause snapshot {old}" in proc.stdout
    assert checksums(start_restored(dest, restored_instances)) == old_sums


def test_restore_of_a_corrupt_snapshot_by_id_fails_and_leaves_nothing(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        pg_root: Path) -> None:
    _inst, (old, new), _sums = two_snapshots
    bad_key = object_only_in(file_store.read_manifest("fb", new),
                             file_store.read_manifest("fb", old))
    file_store.corrupt(bad_key, offset_fraction=0.9)

    dest = pg_root / unique("by-id")
    proc = agent("restore", "--pgdata", str(dest), "--from", new, *file_store.cli_args("fb"))
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"jobmesh agent restore: snapshot {new} is unusable: ")
    assert "damaged" in line and name_prefix(bad_key) in line, proc.stderr
    assert not dest.exists()


async def test_a_failed_verification_wipes_a_pgdata_that_existed(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        pg_root: Path) -> None:
    _inst, (old, new), _sums = two_snapshots
    file_store.corrupt(object_only_in(file_store.read_manifest("fb", new),
                                      file_store.read_manifest("fb", old)),
                       offset_fraction=0.999)
    dest = pg_root / unique("mounted")
    dest.mkdir()  # an empty volume mount: it stays, empty
    with pytest.raises(AgentError, match="an object it lists is damaged"):
        await restore(dest, file_store.open(), "fb", snapshot_id=new)
    assert dest.is_dir() and list(dest.iterdir()) == []


# --- CLI errors -----------------------------------------------------------------------------


def test_cli_restore_of_an_unknown_id_is_one_line(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        pg_root: Path) -> None:
    dest = pg_root / unique("unknown")
    proc = agent("restore", "--pgdata", str(dest), "--from", "20200101T000000000Z-dead",
                 *file_store.cli_args("fb"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "jobmesh agent restore: unknown snapshot id '20200101T000000000Z-dead' for job 'fb' "
        f"(latest is {two_snapshots[1][1]})"]
    assert not dest.exists()


def test_cli_restore_refuses_a_non_empty_pgdata(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        tmp_path: Path) -> None:
    dest = tmp_path / "occupied"
    dest.mkdir()
    (dest / "PG_VERSION").write_text("14\n")
    proc = agent("restore", "--pgdata", str(dest), *file_store.cli_args("fb"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"jobmesh agent restore: {dest} is not empty: refusing to restore over existing files"]
    assert [p.name for p in dest.iterdir()] == ["PG_VERSION"]
    assert (dest / "PG_VERSION").read_text() == "14\n"


def test_cli_restore_with_no_snapshot_at_all(file_store: StoreSpec, tmp_path: Path) -> None:
    proc = agent("restore", "--pgdata", str(tmp_path / "d"), *file_store.cli_args("empty"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"jobmesh agent restore: no snapshot of job 'empty' in {file_store.url}"]


def test_cli_restore_from_an_unreachable_store_is_one_line(s3_server: S3Server,
                                                           tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = agent("restore", "--pgdata", str(tmp_path / "d"), "--store", "s3://bucket/p",
                 "--job", "j", "--s3-endpoint", dead)
    assert proc.returncode == 1
    *logged, line = proc.stderr.strip().splitlines()
    assert line.startswith("jobmesh agent restore: S3 ") and "failed after" in line
    # aiobotocore logs where it found credentials; anything else would be a traceback
    assert all(json.loads(entry)["level"] == "info" for entry in logged), proc.stderr
    assert not (tmp_path / "d").exists()


def test_cli_restore_to_a_time_before_every_snapshot_is_one_line(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        tmp_path: Path) -> None:
    """Any snapshot (pause or base backup) taken before the time can start the replay; a
    time before them all cannot be reached."""
    proc = agent("restore", "--pgdata", str(tmp_path / "d"), "--target-time",
                 "2000-01-01T00:00:00Z", *file_store.cli_args("fb"))
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert "no snapshot of job 'fb' was taken before 2000-01-01" in line
    assert not (tmp_path / "d").exists()


# --- recovery settings (pure) ---------------------------------------------------------------


def test_recovery_settings_quote_the_command_for_postgresql_conf() -> None:
    command = "/opt/py thon/bin/python -m jobmesh agent wal-fetch --store 's3://b/it'\\''s' %f %p"
    text = recovery_settings(command, parse_target_time("2026-11-26 07:23:00"))
    lines = dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line)
    assert lines["restore_command"] == conf_quote(command)
    assert unquote_conf(lines["restore_command"]) == command
    assert shlex.split(unquote_conf(lines["restore_command"]))[-4:] == [
        "--store", "s3://b/it's", "%f", "%p"]
    assert lines["recovery_target_timeline"] == "'latest'"
    assert lines["recovery_target_time"] == "'2026-11-26T07:23:00+00:00'"
    assert lines["recovery_target_action"] == "'promote'"


def test_without_a_target_time_recovery_replays_everything() -> None:
    text = recovery_settings("wal-fetch %f %p", None)
    assert "recovery_target_time =" not in text and "recovery_target_timeline = 'latest'" in text


def unquote_conf(literal: str) -> str:
    """What Postgres's configuration parser makes of a quoted string (quotes, backslashes)."""
    assert literal[0] == literal[-1] == "'"
    out, body, i = [], literal[1:-1], 0
    while i < len(body):
        c = body[i]
        if c == "'" or c == "\\":
            out.append(body[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def test_base_backup_end_time_prefers_the_recorded_end() -> None:
    m = Manifest(kind="base", id="x", job="j", created_at="2026-11-26T07:30:00.000Z",
                 objects=[ObjectEntry("k", 1, "0" * 64)])
    assert backup_end_time(m) == datetime(2026, 11, 26, 7, 30, tzinfo=UTC)
    m2 = Manifest(kind="base", id="x", job="j", created_at="2026-11-26T07:30:00.000Z",
                  objects=[], extra={"end_time": "2026-11-26T07:29:00Z"})
    assert backup_end_time(m2) == datetime(2026, 11, 26, 7, 29, tzinfo=UTC)
    with pytest.raises(AgentError, match="bad --target-time"):
        parse_target_time("yesterday")


def test_restored_pgdata_belongs_to_postgres_with_mode_0700(
        two_snapshots: tuple[Instance, list[str], list[dict[str, str]]], file_store: StoreSpec,
        pg_root: Path) -> None:
    dest = pg_root / unique("modes")
    agent("restore", "--pgdata", str(dest), *file_store.cli_args("fb"), check=True)
    assert dest.stat().st_mode & 0o777 == 0o700
    user = os_user()
    expected = pwd.getpwnam(user).pw_uid if user else os.geteuid()
    assert {p.lstat().st_uid for p in [dest, *dest.rglob("*")]} == {expected}


# --- base backups: recovery from archived WAL ----------------------------------------------


@pytest.fixture(params=["file", "s3"])
async def wal_store(request: pytest.FixtureRequest, pg_root: Path) -> AsyncIterator[StoreSpec]:
    """A store that wal-fetch, running as the Postgres OS user, can read."""
    yield new_store_spec(request, request.param, pg_root)


async def start_recovered(pgdata: Path, started: list[Instance]) -> Instance:
    """Start a restored base backup; returns once recovery has ended and it accepts writes.

    pg_ctl's wait ends when replay begins, so we follow the server log (tail -F)
    until Postgres says that recovery is over.
    """
    inst = Instance(pgdata, port=free_port(), settings={"fsync": "off"})
    started.append(inst)
    inst.logfile.touch()
    tail = await asyncio.create_subprocess_exec("tail", "-n", "+1", "-F", str(inst.logfile),
                                                stdout=asyncio.subprocess.PIPE)
    seen: list[str] = []
    try:
        inst.start(timeout=120)
        assert tail.stdout is not None
        async with asyncio.timeout(120):
            while "database system is ready to accept connections" not in (
                    line := (await tail.stdout.readline()).decode()):
                seen.append(line)
                assert "FATAL" not in line and "PANIC" not in line, "".join(seen)
    except Exception as exc:
        raise AssertionError(f"recovery failed: {exc!r}\n{''.join(seen)[-3000:]}") from exc
    finally:
        tail.kill()
        await tail.wait()
    return inst


def batches(inst: Instance, db: str) -> str:
    return inst.psql("select string_agg(batch || n, ' ' order by batch) "
                     "from (select batch, count(*) n from batches group by batch) x", database=db)


async def test_target_time_restores_the_newest_base_backup_before_it_plus_wal(
        wal_store: StoreSpec, pg_root: Path, restored_instances: list[Instance]) -> None:
    job = unique("pitr")
    base = pg_root / job
    init_pgdata(base / "pgdata", job, spool=base / "spool", archive_timeout=3600)
    inst = Instance(base / "pgdata", port=free_port())
    restored_instances.append(inst)
    inst.start()
    db = f"job_{job}"
    dsn = f"postgresql://postgres@/{db}?host={inst.socket_dir}&port={inst.port}"
    store = wal_store.open()
    try:
        before_any = inst.psql("select now()")
        inst.psql("create table batches (batch text, n int)", database=db)
        first = await take_base_backup(dsn, inst.datadir, store, job)
        inst.psql("insert into batches select 'A', g from generate_series(1, 100) g", database=db)
        second = await take_base_backup(dsn, inst.datadir, store, job)
        target = inst.psql("select now()")  # after A's commit and the second backup
        inst.psql("insert into batches select 'B', g from generate_series(1, 50) g", database=db)
        inst.psql("select pg_switch_wal()")
        inst.stop()  # a clean stop archives every finished segment into the spool
        await Archiver(store, job, base / "spool").drain()

        pitr = pg_root / unique("pitr-restored")
        result = await restore(pitr, store, job, target_time=target,
                               s3_endpoint=wal_store.endpoint)
        assert (result.manifest.id, result.manifest.kind) == (second.id, "base")
        assert result.recovery_configured and (pitr / "recovery.signal").exists()
        assert first.id < second.id
        restored = await start_recovered(pitr, restored_instances)
        assert batches(restored, db) == "A100"

        everything = pg_root / unique("latest-restored")
        result = await restore(everything, store, job, s3_endpoint=wal_store.endpoint)
        assert result.manifest.id == second.id
        restored = await start_recovered(everything, restored_instances)
        assert batches(restored, db) == "A100 B50"

        with pytest.raises(AgentError, match=r"no snapshot of job .* was taken before"):
            await restore(pg_root / unique("too-early"), store, job, target_time=before_any)
    finally:
        await store.close()
