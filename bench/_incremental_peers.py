"""What bench/incremental.py runs against: the source PostgreSQL and the changes it makes
between snapshots, jobmesh's pause snapshot and restores into a ``file://`` store,
pgBackRest's offline backups and restores of the same stopped cluster, timed starts, and
a probe that says where a pause's or a restore's time goes.

Everything started registers its own cleanup on the ExitStack it is given (``Started``
stops every PGDATA it launched), so an error or Ctrl-C later still stops it.
pgBackRest and PostgreSQL run as the Postgres OS user, as beside a real cluster.

Over ~400 lines on purpose: each peer's steps for bench/incremental.py (pgBackRest,
jobmesh, the floor, the probe that says where jobmesh's time goes) in one place, as
bench/_backup_peers.py does for bench/backup.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import resource
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from _backup_peers import PGBACKREST, timed
from _peers import BenchError

from jobmesh.agent.postgres import Instance, bin_dir, free_port, give_to_postgres, run_pg
from jobmesh.agent.store import open_store

DATABASE = "job_bench"
JOB = "incr"
STANZA = "incr"
ROW_BYTES = 141  # heap bytes per row of t (as bench/wake.py: 136-byte tuples + line pointer)
FILL = ("CREATE TABLE t AS SELECT g, md5(g::text) AS a, md5((-g)::text) AS b,"
        " repeat('x', 40) AS c FROM generate_series(1, {rows}) g")
APPEND = ("INSERT INTO t SELECT g, md5(g::text), md5((-g)::text), repeat('x', 40)"
          " FROM generate_series({first}, {last}) g")
UPDATE_RANGE = "UPDATE t SET c = repeat('y', 40) WHERE g BETWEEN {x} AND {x} + {n}"
UPDATE_RANDOM = "UPDATE t SET c = repeat('z', 40) WHERE g % 100 = {k}"
FIRST_ROW = "SELECT 1 FROM t LIMIT 1"
CONTENT = ("SELECT count(*) || ' rows, sum(g) ' || sum(g) || ', sum(hashtext(a||b||c)) ' "
           "|| sum(hashtext(a || b || c)) FROM t")
# The source and every restored copy start with these (and their own port and socket).
SETTINGS = {"fsync": "off", "synchronous_commit": "off"}
HASH_CACHE = ".jobmesh-hashes"

def psql(pgdata: Path, port: int, sql: str, *, database: str = DATABASE,
         timeout: float = 3600) -> str:
    """SQL as the superuser over the Unix socket in PGDATA (Instance.psql stops at 120 s)."""
    proc = run_pg([str(bin_dir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                   "-h", str(pgdata), "-p", str(port), "-U", "postgres", "-d", database,
                   "-c", sql], check=False, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"psql {sql[:60]!r} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip()


# --- PostgreSQL instances -------------------------------------------------------------


@dataclass
class Started:
    """Every PGDATA the bench started, stopped (immediate) at the end whatever happened."""

    pgdata: set[Path] = field(default_factory=set)

    def stop_all(self) -> None:
        for d in self.pgdata:
            with contextlib.suppress(Exception):
                if (d / "postmaster.pid").exists():
                    run_pg([str(bin_dir() / "pg_ctl"), "stop", "-D", str(d), "-m", "immediate",
                            "-w", "-t", "30"], check=False, timeout=40)


def pg_ctl_start(pgdata: Path, port: int, started: Started, *, wait: bool) -> None:
    opts = {"port": str(port), "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(pgdata), **SETTINGS}
    o = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in opts.items())
    logfile = pgdata.parent / f"{pgdata.name}.log"
    logfile.touch()
    give_to_postgres(logfile)
    started.pgdata.add(pgdata)
    proc = run_pg([str(bin_dir() / "pg_ctl"), "start", "-w" if wait else "-W", "-t", "600",
                   "-D", str(pgdata), "-l", str(logfile), "-o", o], check=False, timeout=610)
    if proc.returncode != 0:
        tail = logfile.read_text()[-1200:] if logfile.exists() else ""
        raise BenchError(f"pg_ctl start of {pgdata} failed: {proc.stderr.strip()[-300:]}\n{tail}")


def pg_ctl_stop(pgdata: Path) -> None:
    """A clean (fast) shutdown: the next start needs no recovery, and a pause can follow."""
    proc = run_pg([str(bin_dir() / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "fast", "-w",
                   "-t", "600"], check=False, timeout=610)
    if proc.returncode != 0:
        raise BenchError(f"pg_ctl stop of {pgdata} failed: {proc.stderr.strip()[-300:]}")


async def _poll_first_row(pgdata: Path, port: int, timeout: float = 600) -> float:
    """Connect every 5 ms until PostgreSQL accepts, run FIRST_ROW; perf_counter when done."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            conn = await asyncpg.connect(host=str(pgdata), port=port, user="postgres",
                                         database=DATABASE, timeout=10)
            break
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if time.perf_counter() > deadline:
                raise BenchError(f"PostgreSQL on {pgdata} did not accept connections: "
                                 f"{exc}") from exc
            await asyncio.sleep(0.005)
    try:
        if await conn.fetchrow(FIRST_ROW) is None:
            raise BenchError(f"{FIRST_ROW!r} returned no row on {pgdata}")
        return time.perf_counter()
    finally:
        await conn.close()


def start_to_first_row(pgdata: Path, started: Started) -> tuple[float, int]:
    """``pg_ctl start`` (no wait) of a stopped PGDATA, then connect + first row: seconds,
    and the port it listens on. Leaves it running."""
    port = free_port()
    t0 = time.perf_counter()
    pg_ctl_start(pgdata, port, started, wait=False)
    done = asyncio.run(_poll_first_row(pgdata, port))
    return done - t0, port


def check_restored(pgdata: Path, port: int, expected: str) -> str:
    """Compare a running restored cluster's data with the source's, then stop it."""
    try:
        got = psql(pgdata, port, CONTENT)
    finally:
        pg_ctl_stop(pgdata)
    return "identical" if got == expected else f"DIFFERENT: {got} (source: {expected})"


def settle() -> None:
    """Write back what the last step left dirty, so it does not land in the next timing."""
    os.sync()
    time.sleep(0.3)


def copy_tree(src: Path, dst: Path) -> None:
    """``cp -a``: contents, owners, modes and mtimes (so the hash cache stays valid)."""
    proc = subprocess.run(["cp", "-a", str(src), str(dst)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"cp -a {src} {dst} failed: {proc.stderr.strip()[-300:]}")


def dd_seconds(path: Path, mib: int) -> float:
    """Wall seconds to write ``mib`` MiB of zeros and fdatasync them (the disk's floor)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}",
                           "conv=fdatasync"], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise BenchError(f"dd failed: {proc.stderr.strip()[-300:]}")
    return seconds


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# --- the source cluster and its changes -------------------------------------------------


class Source:
    """The job's PostgreSQL: table t, and the changes made between two snapshots."""

    def __init__(self, root: Path, started: Started) -> None:
        self.inst = Instance(root / "pgdata", port=free_port(), settings=dict(SETTINGS))
        self.started = started
        self.rows = 0  # the greatest g so far

    @property
    def pgdata(self) -> Path:
        return self.inst.datadir

    def sql(self, text: str) -> str:
        return psql(self.pgdata, self.inst.port, text)

    def start(self) -> None:
        pg_ctl_start(self.pgdata, self.inst.port, self.started, wait=True)

    def stop(self) -> None:
        pg_ctl_stop(self.pgdata)

    def load(self, rows: int) -> dict[str, Any]:
        """initdb, t with ``rows`` rows, VACUUM FREEZE (so that no later read sets hint bits
        or freezes pages the changes did not touch), checkpoint; left stopped."""
        self.inst.initdb()
        self.start()
        t0 = time.perf_counter()
        psql(self.pgdata, self.inst.port, f"CREATE DATABASE {DATABASE}", database="postgres")
        self.sql(FILL.format(rows=rows))
        self.sql("VACUUM (FREEZE, ANALYZE) t")
        self.sql("CHECKPOINT")
        self.rows = rows
        table = int(self.sql("SELECT pg_relation_size('t')"))
        content = self.sql(CONTENT)  # every page frozen and hinted: reading writes nothing
        self.stop()
        return {"rows": rows, "table_bytes": table, "content": content,
                "load_seconds": round(time.perf_counter() - t0, 1)}

    def change(self, statements: list[str]) -> dict[str, Any]:
        """Start, run the statements, read the new content, stop cleanly (nothing timed
        but the statements)."""
        self.start()
        t0 = time.perf_counter()
        for s in statements:
            self.sql(s)
        seconds = time.perf_counter() - t0
        content = self.sql(CONTENT)  # touches only pages the change dirtied (all frozen else)
        self.stop()
        return {"sql": statements, "sql_seconds": round(seconds, 2), "content": content}

    def appends(self, append_rows: int, rng_x: int) -> dict[str, Any]:
        """New rows at the end, and a contiguous 1% of the rows updated."""
        first, last = self.rows + 1, self.rows + append_rows
        n = self.rows // 100
        x = 1 + rng_x % max(1, self.rows - n)
        out = self.change([APPEND.format(first=first, last=last),
                           UPDATE_RANGE.format(x=x, n=n)])
        self.rows = last
        return out

    def random(self, k: int) -> dict[str, Any]:
        """1% of the rows, spread over the whole table, updated."""
        return self.change([UPDATE_RANDOM.format(k=k)])


# --- jobmesh ----------------------------------------------------------------------------


class _Captured(logging.Handler):
    """Keeps the delta restore's own summary line (restore() returns no RestoreStats)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_CAPTURED = _Captured()
logging.getLogger("jobmesh.agent.restore").addHandler(_CAPTURED)
logging.getLogger("jobmesh.agent.restore").setLevel(logging.INFO)


class Jobmesh:
    """Pause snapshots and restores of the source, in this process, to a file:// store."""

    def __init__(self, store_dir: Path) -> None:
        store_dir.mkdir()
        self.url = f"file://{store_dir}"
        self.store_dir = store_dir
        self.captured = _CAPTURED

    def snapshot(self, pgdata: Path, probe: Probe) -> tuple[Any, dict[str, Any]]:
        """take_snapshot of the stopped PGDATA; (manifest, measures)."""
        from jobmesh.agent.snapshot import take_snapshot

        async def go() -> Any:
            store = open_store(self.url)
            try:
                return await take_snapshot(pgdata, store, JOB)
            finally:
                await store.close()

        probe.reset()
        objects_before = tree_bytes(self.store_dir / "_objects")
        with timed(resource.RUSAGE_SELF) as t:
            manifest = asyncio.run(go())
        x = manifest.extra
        # What the pause added to the store, counted on disk: extra["new_bytes"] is summed
        # with ``result.new_bytes += await objects.put(...)`` in cas/upload.py, which loses
        # updates when puts overlap (the old value is read before the await).
        objects_added = tree_bytes(self.store_dir / "_objects") - objects_before
        manifest_bytes = (self.store_dir / JOB / "snapshots" / manifest.id
                          / "manifest.json").stat().st_size
        return manifest, {
            "seconds": round(t["seconds"], 3), "cpu_s": round(t["cpu_s"], 2),
            "uploaded_bytes": objects_added + manifest_bytes, "object_bytes": objects_added,
            "manifest_bytes": manifest_bytes, "new_bytes_reported": x["new_bytes"],
            "read_bytes": x["read_bytes"],
            "new_objects": x["new_objects"], "objects": len(manifest.object_names()),
            "files": x["files"], "snapshot_bytes": manifest.uncompressed_size,
            "snapshot_id": manifest.id, "where_time_goes": probe.take()}

    def restore(self, target: Path, snapshot_id: str, *, delta: bool,
                probe: Probe) -> dict[str, Any]:
        from jobmesh.agent.restore import restore

        async def go() -> Any:
            store = open_store(self.url)
            try:
                return await restore(target, store, JOB, snapshot_id=snapshot_id, delta=delta)
            finally:
                await store.close()

        self.captured.records.clear()
        probe.reset()
        t0 = time.perf_counter()
        result = asyncio.run(go())
        seconds = time.perf_counter() - t0
        if result.recovery_configured:
            raise BenchError(f"snapshot {snapshot_id} needs WAL replay: not a pause snapshot")
        out: dict[str, Any] = {"seconds": round(seconds, 3),
                               "written_bytes": result.bytes_restored,
                               "where_time_goes": probe.take()}
        for r in self.captured.records:
            if "by delta" in r.getMessage() and isinstance(r.args, tuple) and len(r.args) >= 6:
                _sid, files, reused, fetched, _written, hashed = r.args[:6]
                out.update(files=files, reused_files=reused, fetched_objects=fetched,
                           hashed_mb=round(float(hashed), 1))
        return out

    def store_bytes(self) -> int:
        return tree_bytes(self.store_dir)


# --- pgBackRest ---------------------------------------------------------------------------


class PgBackRest:
    """Offline (``--no-online``) backups of the stopped source into a posix repository:
    the same cleanly shut down PGDATA a pause snapshot is taken of, so a restore needs no
    WAL replay."""

    def __init__(self, root: Path, pgdata: Path, processes: int) -> None:
        self.base = root / "pgbackrest"
        self.repo = self.base / "repo"
        self.config = self.base / "pgbackrest.conf"
        for d in (self.base, self.repo, self.base / "log", self.base / "lock",
                  self.base / "spool"):
            d.mkdir(exist_ok=True)
        self.config.write_text(f"""\
[global]
repo1-path={self.repo}
repo1-retention-full=2
compress-type=zst
process-max={processes}
log-path={self.base / 'log'}
lock-path={self.base / 'lock'}
spool-path={self.base / 'spool'}
log-level-console=warn
log-level-file=info

[{STANZA}]
pg1-path={pgdata}
""")
        give_to_postgres(self.base)

    def run(self, *args: str, timeout: float = 3600) -> str:
        try:
            proc = run_pg([str(PGBACKREST), f"--config={self.config}", f"--stanza={STANZA}",
                           *args], check=False, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"pgbackrest {' '.join(args)} timed out") from exc
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise BenchError(f"pgbackrest {' '.join(args)} exited {proc.returncode}: {tail}")
        return proc.stdout

    def stanza_create(self) -> None:
        self.run("--no-online", "stanza-create")

    def backup(self, kind: str) -> dict[str, Any]:
        """``backup --no-online --type=kind`` (the hash cache excluded, as jobmesh's own
        file); seconds and the bytes this backup stored."""
        before = tree_bytes(self.repo)
        with timed(resource.RUSAGE_CHILDREN) as t:
            self.run("--no-online", f"--type={kind}", f"--exclude={HASH_CACHE}", "backup")
        repo_delta = tree_bytes(self.repo) - before
        last = json.loads(self.run("--output=json", "info"))[0]["backup"][-1]
        info = last["info"]
        split = self.stored_split(last["label"])
        return {"seconds": round(t["seconds"], 3), "cpu_s": round(t["cpu_s"], 2),
                "label": last["label"], "stored_bytes": info["repository"]["delta"],
                "repo_growth_bytes": repo_delta, "changed_bytes": info["delta"],
                "backup_bytes": info["size"], **split}

    def stored_split(self, label: str) -> dict[str, int]:
        """Of what this backup stored (files without a reference to an older one): files
        and repository bytes in pg_wal, and elsewhere."""
        manifest = self.repo / "backup" / STANZA / label / "backup.manifest"
        out = {"stored_files": 0, "stored_wal_files": 0, "stored_wal_bytes": 0}
        section = ""
        for line in manifest.read_text().splitlines():
            if line.startswith("["):
                section = line.strip("[]")
                continue
            if section != "target:file" or "=" not in line:
                continue
            name, _, raw = line.partition("=")
            meta = json.loads(raw)
            if "reference" in meta:
                continue
            out["stored_files"] += 1
            if name.startswith("pg_data/pg_wal/"):
                out["stored_wal_files"] += 1
                out["stored_wal_bytes"] += int(meta.get("repo-size", meta.get("size", 0)))
        return out

    def restore(self, target: Path, label: str, *, delta: bool = False,
                force: bool = False) -> dict[str, Any]:
        """``restore --set=label`` into ``target`` (empty, or with --delta a stale copy)."""
        if not target.exists():
            target.mkdir(mode=0o700)
            give_to_postgres(target)
        args = [f"--pg1-path={target}", f"--set={label}", "--type=none"]
        if delta:
            args.append("--delta")
        if force:
            args.append("--force")
        t0 = time.perf_counter()
        self.run(*args, "restore")
        return {"seconds": round(time.perf_counter() - t0, 3)}


# --- where the time goes -------------------------------------------------------------------


class Probe:
    """Cumulative seconds and calls of chosen product functions, by wrapping them (module
    attributes the product looks up at call time). Threads add up: with 8 or 16 workers the
    sums can exceed the wall time; they say where the work is, not a timeline."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: dict[str, list[float]] = {}
        self.undo: list[Callable[[], None]] = []

    def _add(self, name: str, seconds: float) -> None:
        with self.lock:
            t = self.totals.setdefault(name, [0, 0.0])
            t[0] += 1
            t[1] += seconds

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        orig = getattr(owner, attr)
        if asyncio.iscoroutinefunction(orig):
            @functools.wraps(orig)
            async def awrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await orig(*a, **kw)
                finally:
                    self._add(name, time.perf_counter() - t0)
            setattr(owner, attr, awrapper)
        else:
            @functools.wraps(orig)
            def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return orig(*a, **kw)
                finally:
                    self._add(name, time.perf_counter() - t0)
            setattr(owner, attr, wrapper)
        self.undo.append(lambda: setattr(owner, attr, orig))

    def install(self) -> None:
        import jobmesh.agent.cas as cas
        import jobmesh.agent.fetch as fetch
        import jobmesh.agent.restore as restore
        import jobmesh.agent.snapshot as snapshot
        from jobmesh.agent.cas import download, leases, objects, upload
        from jobmesh.agent.store.file import FileStore

        for owner, attr, name in [
            (snapshot, "check_stopped_pgdata", "pause: pg_controldata check"),
            (snapshot, "recycled_wal", "pause: recycled WAL list"),
            (cas, "_cache", "pause: read hash cache"),
            (upload, "scan", "pause: scan tree (lstat)"),
            (upload, "read_chunk", "pause: read chunks"),
            (objects.Objects, "name", "hash chunks (HMAC-SHA256)"),
            (objects.Objects, "exists", "store lookups"),
            (objects.Objects, "encode", "pause: compress chunks"),
            (objects.Objects, "put", "pause: write objects (fsync+rename)"),
            (cas, "put_bytes", "pause: write manifest"),
            (leases.Lease, "__aenter__", "pause: take lease"),
            (leases.Lease, "__aexit__", "pause: drop lease"),
            (snapshot, "write_cache", "pause: write hash cache"),
            (fetch, "_objects", "restore: load keyring"),
            (download, "_prune_local", "restore: prune local"),
            (download, "_lstat_all", "restore: lstat files"),
            (download, "_local_names", "restore: hash local files"),
            (objects.Objects, "get", "restore: get objects (read+decode)"),
            (objects.Objects, "decode", "restore: decompress+verify"),
            (download, "_pwrite", "restore: pwrite chunks"),
            (download, "_finish_file", "restore: finish files (fsync, chmod, utime)"),
            (download, "fsync_path", "restore: fsync files and dirs"),
            (download, "syncfs", "restore: syncfs"),
            (FileStore, "read_sync", "restore: read objects (file://)"),
            (download, "write_cache", "restore: write hash cache"),
            (restore, "_sync_few", "restore: final syncs"),
        ]:
            self.wrap(owner, attr, name)

    def uninstall(self) -> None:
        while self.undo:
            self.undo.pop()()

    def reset(self) -> None:
        with self.lock:
            self.totals = {}

    def take(self) -> dict[str, dict[str, float]]:
        with self.lock:
            return {k: {"calls": int(v[0]), "cum_s": round(v[1], 3)}
                    for k, v in sorted(self.totals.items(), key=lambda kv: -kv[1][1])}


# --- chunk size ------------------------------------------------------------------------------


@contextlib.contextmanager
def chunk_size(size: int) -> Iterator[None]:
    """Set the object chunk size for a measurement by patching the module globals that hold
    it (objects, upload, cas, snapshot), restoring them afterwards."""
    import jobmesh.agent.cas as cas
    import jobmesh.agent.snapshot as snapshot
    from jobmesh.agent.cas import objects, upload

    saved = (objects.CHUNK_SIZE, objects.MAX_OBJECT, upload.CHUNK_SIZE, cas.CHUNK_SIZE,
             snapshot.CHUNK_SIZE)
    objects.CHUNK_SIZE = upload.CHUNK_SIZE = cas.CHUNK_SIZE = snapshot.CHUNK_SIZE = size
    objects.MAX_OBJECT = size + (size >> 4) + 4096
    try:
        yield
    finally:
        (objects.CHUNK_SIZE, objects.MAX_OBJECT, upload.CHUNK_SIZE, cas.CHUNK_SIZE,
         snapshot.CHUNK_SIZE) = saved


def swap_cache(pgdata: Path, park: Path, bring: Path) -> None:
    """Move PGDATA's hash cache to ``park`` and ``bring`` (if any) into its place: each
    chunk size's store has its own key, so each keeps its own cache between its pauses."""
    cache = pgdata / HASH_CACHE
    if cache.exists():
        os.replace(cache, park)
    if bring.exists():
        os.replace(bring, cache)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
