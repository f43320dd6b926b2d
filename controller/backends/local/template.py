"""The template every new local job starts from, and copies of it kept ready on disk.

Running initdb per job would cost about a second (initdb, then a start and a
stop to create the job's database and roles). Instead one template PGDATA is
made per store, major version and ``REVISION`` of what it holds (agent job
name ``TEMPLATE-15``: upper case, so no catalog job id, which is lower case,
can collide with it), stored as a pause snapshot named by ``template.json``,
and restored once into ``<dir>/<snapshot id>/pgdata``, the local master copy.
A new job's PGDATA is a copy of the master.

Copying ~48 MB in ~1,300 files is then the slowest step of a create (0.1 to
1 s on a small VM, most of it creating files), so a few copies ("spares")
are kept ready beside the master: a create renames one into place, which
takes no time, and the spare is replaced in the background.

What the template bakes in: the job database ``job_TEMPLATE-15`` (renamed at
create) owned by ``job_owner``, ``job_reader`` with SELECT only (tables and
sequences; no temporary tables, no large objects: see ``jobmesh.agent.init``)
and read-only transactions by default, the dblink and postgres_fdw extensions
(jobs read one another through the router), pg_hba (socket: trust, since the
socket directory is private; TCP from 127.0.0.1: SCRAM), SCRAM password
hashing, and modest memory so many small jobs share a machine. What differs
per job (port, sockets, spool, archive_timeout) is given on the command line at
every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from jobmesh.agent.init import init_pgdata, prepare_serving
from jobmesh.agent.manifest import Manifest, ManifestError, now_iso, snapshot_manifest_key
from jobmesh.agent.postgres import (
    Instance,
    PostgresError,
    bin_dir,
    free_port,
    give_to_postgres,
    pid_alive,
    run_pg,
)
from jobmesh.agent.restore import restore
from jobmesh.agent.snapshot import take_snapshot
from jobmesh.agent.store import NotFound, Store, StoreError, get_bytes, put_bytes

from .in_place import sync_tree

log = logging.getLogger("jobmesh.controller.template")

REFILL_DELAY = 1.0  # seconds after a spare was taken before another is made
# What goes into the template changed: a store's older template is replaced by a new one
# (and its local master and spares with it). Bump it with every change to what
# init_pgdata, prepare_serving or _make_pgdata set up. 4: the reader may read sequences,
# has no TEMPORARY, and may not create large objects. 5: the agent streams WAL with
# pg_receivewal over the socket (a local replication line).
REVISION = 5
ABOUT = "template.json"  # in the template's store prefix: its revision and snapshot id

HBA = [
    "# jobmesh: the socket directory is private (0700, the postgres OS user), so trusting",
    "# it reaches only the superuser's own tools; TCP needs the job's password.",
    "local   all   all                  trust",
    "local   replication   all          trust",
    "host    all   all   127.0.0.1/32   scram-sha-256",
]

SETTINGS = {
    "shared_buffers": "32MB",  # many small jobs per machine; a big job can be given more
    "password_encryption": "'scram-sha-256'",
    "unix_socket_permissions": "0700",
    "huge_pages": "off",  # a failed huge-page attempt per start buys nothing at this size
    # Session mode: every client of the router is a backend. 100 (the default) minus the
    # superuser's reserve would refuse the 98th client of a busy job.
    "max_connections": "200",
}

# Set after the template's own last start: every job gives these on its command line.
PER_JOB = {
    "listen_addresses": "''",
    "basic_archive.archive_directory": "''",  # archive nowhere rather than somewhere stale
}


def major_version() -> str:
    """The major version of the PostgreSQL binaries we run ("15")."""
    out = run_pg([str(bin_dir() / "postgres"), "--version"]).stdout
    m = re.search(r"\(PostgreSQL\) (\d+)", out)
    if m is None:
        raise PostgresError(f"cannot tell the PostgreSQL version from {out.strip()!r}")
    return m.group(1)


class Template:
    """The template snapshot in the store and its copies under ``directory``."""

    def __init__(self, directory: Path, store: Store, *, spares: int = 2) -> None:
        self.dir = directory
        self.store = store
        self.spares = spares
        self.name = ""  # "TEMPLATE-<major>", known after ensure()
        self.manifest: Manifest | None = None
        self._master: Path | None = None
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._copying: asyncio.Future[None] | None = None  # the spare being copied, if any

    @property
    def database(self) -> str:
        """The job database inside the template (renamed to the job's at create)."""
        return f"job_{self.name}"

    async def ensure(self) -> None:
        """Find the store's template (or make and store one), keep a local master copy of
        it, and start keeping spares."""
        async with self._lock:
            if self._master is not None:
                return
            await asyncio.to_thread(_mkdir_reachable, self.dir)
            self.name = "TEMPLATE-" + await asyncio.to_thread(major_version)
            manifest = await self._stored() or await self._build()
            master = self.dir / manifest.id / "pgdata"
            if not await asyncio.to_thread(master.is_dir):
                await self._restore_master(manifest)
            await asyncio.to_thread(self._forget_others, manifest.id)
            self.manifest, self._master = manifest, master
            await self._refill()  # so that even the first create finds a spare
            self._filler = asyncio.create_task(self._fill(), name="template spares")

    async def take(self, dest: Path) -> str:
        """Put a fresh copy of the template at ``dest`` (which must not exist); returns how
        ("spare": renamed into place, "copy": copied now)."""
        await self.ensure()
        try:
            if await asyncio.to_thread(self._take_spare, dest):
                return "spare"
            assert self._master is not None
            await asyncio.to_thread(_copy_tree, self._master, dest)
            return "copy"
        finally:
            self._wanted.set()

    async def close(self) -> None:
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
            self._filler = None
        # A copy runs in a thread, which cancelling does not stop: wait for it, so
        # that no half-made spare is renamed into place after we are gone (a backend
        # started next on the same directory would hand it out as a template copy).
        if self._copying is not None:
            with contextlib.suppress(Exception):
                await self._copying
            self._copying = None

    # -- the store's template -----------------------------------------------------------

    async def _stored(self) -> Manifest | None:
        """The store's template, if it is of our revision (``template.json`` names it)."""
        try:
            about = json.loads(await get_bytes(self.store, f"{self.name}/{ABOUT}"))
            if about.get("revision") != REVISION:
                return None
            m = Manifest.from_json(await get_bytes(
                self.store, snapshot_manifest_key(self.name, str(about["snapshot"]))))
        except (NotFound, ManifestError, ValueError, KeyError, TypeError):
            return None
        return m if m.kind == "pause" else None

    async def _build(self) -> Manifest:
        log.info("making the template %s, revision %d (once per store)", self.name, REVISION)
        build = self.dir / f".build-{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread(_make_pgdata, build, self.name)
            manifest = await take_snapshot(build / "pgdata", self.store, self.name)
        finally:
            await asyncio.to_thread(shutil.rmtree, build, True)
        about = {"revision": REVISION, "snapshot": manifest.id, "created_at": now_iso()}
        await put_bytes(self.store, f"{self.name}/{ABOUT}", json.dumps(about).encode())
        return manifest

    async def _restore_master(self, manifest: Manifest) -> None:
        """Restore (verified) into a scratch directory, then rename it into place, so a
        master that exists is always whole."""
        scratch = self.dir / f".restore-{secrets.token_hex(4)}"
        try:
            await asyncio.to_thread(_mkdir_reachable, scratch)
            result = await restore(scratch / "pgdata", self.store, self.name,
                                   snapshot_id=manifest.id)
            if result.recovery_configured:  # nobody archives WAL for the template
                raise StoreError(f"the template {self.name} in {self.store.url} has WAL "
                                 "archived after it; remove it from the store")
            await asyncio.to_thread(scratch.rename, self.dir / manifest.id)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    def _forget_others(self, keep: str) -> None:
        """Masters of older templates and copies a crash left half-made."""
        for entry in self.dir.iterdir():
            if entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)
        spares = self.dir / keep / "spares"
        if spares.is_dir():
            for entry in spares.iterdir():
                if entry.name.startswith(".") and not _copying_now(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)

    # -- spares -------------------------------------------------------------------------

    def _spare_dir(self) -> Path:
        assert self.manifest is not None
        return self.dir / self.manifest.id / "spares"

    def _ready_spares(self) -> list[Path]:
        try:
            return sorted(p for p in self._spare_dir().iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _take_spare(self, dest: Path) -> bool:
        for spare in self._ready_spares():
            try:
                spare.rename(dest)
            except FileNotFoundError:
                continue  # taken by a concurrent create
            return True
        return False

    async def _fill(self) -> None:
        """Keep ``spares`` copies ready; runs until close()."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            # Copying competes for the disk and the CPU with the create that took the
            # spare, which is still starting its Postgres: let that go first.
            await asyncio.sleep(REFILL_DELAY)
            await self._refill()

    async def _refill(self) -> None:
        """Make spares up to ``spares``; a failure (a full disk) only costs speed: creates
        copy the master themselves meanwhile."""
        try:
            while len(await asyncio.to_thread(self._ready_spares)) < self.spares:
                self._copying = asyncio.ensure_future(asyncio.to_thread(self._make_spare))
                await asyncio.shield(self._copying)  # close() waits for the thread
                self._copying = None
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot make a spare copy of the template: %s", exc)
        except Exception:
            log.exception("cannot make a spare copy of the template")

    def _make_spare(self) -> None:
        assert self._master is not None
        spares = self._spare_dir()
        spares.mkdir(mode=0o700, exist_ok=True)
        token = secrets.token_hex(4)
        scratch = spares / f".{os.getpid()}-{token}"  # _copying_now() reads the pid
        try:
            _copy_tree(self._master, scratch)
            scratch.rename(spares / token)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _copying_now(scratch_name: str) -> bool:
    """Whether a half-made spare (``.<pid>-<token>``) is still being copied by a live process.

    Another backend on the same root (a controller restarted while the old one's
    copy thread still runs, or two in one process) must not delete it: ``cp``
    would go on filling a directory whose first files are gone, succeed, and
    the rename would hand out a copy without ``postgresql.conf``.
    """
    pid, _, _ = scratch_name.removeprefix(".").partition("-")
    return pid.isdigit() and pid_alive(int(pid))


def _copy_tree(src: Path, dest: Path) -> None:
    """A copy keeping owners and modes (reflinked where the file system can), synced, so
    that the job's ``ready`` marker never stands for data a host crash could tear."""
    proc = subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dest)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise OSError(f"cannot copy the template to {dest}: {proc.stderr.strip()}")
    sync_tree(dest)


def _mkdir_reachable(path: Path) -> None:
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.chmod(0o755)  # the postgres OS user goes through it to PGDATA


def _make_pgdata(build: Path, name: str) -> None:
    """initdb (through ``agent init``), then our settings; leaves it cleanly stopped."""
    _mkdir_reachable(build)
    pgdata = build / "pgdata"
    init_pgdata(pgdata, name, spool=build / "spool")
    (pgdata / "pg_hba.conf").write_text("\n".join(HBA) + "\n")
    _append_conf(pgdata, "jobmesh local backend template", SETTINGS)
    inst = Instance(pgdata, port=free_port())
    inst.start()
    try:
        # As a pod's `agent init --role-password-env` does: the same grants and extensions.
        prepare_serving(inst, f"job_{name}")
        inst.psql("CHECKPOINT")
    finally:
        inst.stop("fast")
    _append_conf(pgdata, "given per job on the command line at every start", PER_JOB)
    give_to_postgres(pgdata)


def _append_conf(pgdata: Path, comment: str, settings: dict[str, str]) -> None:
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# {comment}\n")
        conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
