"""Format 1 pause snapshots, written exactly as agents before content-addressed objects did.

One ``snapshots/<id>/data.tar.zst`` (PGDATA as a zstd-compressed tar, from
``tarstream.tar_zst_chunks``) and then ``snapshots/<id>/manifest.json``
with ``format: 1``, holding only the fields those agents knew (no files,
dirs, key_id or chunk_size). Stores written by them must keep restoring.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

from jobmesh.agent.manifest import (
    Manifest,
    ObjectEntry,
    job_prefix,
    new_id,
    now_iso,
    snapshot_data_key,
    snapshot_manifest_key,
)
from jobmesh.agent.snapshot import check_stopped_pgdata, recycled_wal
from jobmesh.agent.store import Store, put_bytes
from jobmesh.agent.tarstream import tar_zst_chunks

_EXCLUDE = frozenset({"postmaster.pid", "postmaster.opts"})  # as the old snapshot.py had it
_FORMAT_2_FIELDS = ("files", "dirs", "key_id", "chunk_size")


def v1_manifest_json(manifest: Manifest) -> bytes:
    """The manifest as the format 1 ``Manifest.to_json`` wrote it."""
    doc = {k: v for k, v in asdict(manifest).items() if k not in _FORMAT_2_FIELDS}
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


async def take_v1_snapshot(pgdata: Path, store: Store, job: str) -> Manifest:
    """A format 1 pause snapshot of a cleanly stopped PGDATA; returns its stored manifest."""
    pgdata = await asyncio.to_thread(pgdata.absolute)  # Postgres tools run from /
    control, pg_version = await asyncio.to_thread(check_stopped_pgdata, pgdata)
    skip = _EXCLUDE | await asyncio.to_thread(recycled_wal, pgdata, control)
    sid = new_id()
    data_key = snapshot_data_key(job, sid)
    stream = tar_zst_chunks(pgdata, exclude=skip.__contains__)
    try:
        stored = await store.put(data_key, stream)
    finally:
        await stream.aclose()
    manifest = Manifest(
        kind="pause", id=sid, job=job, created_at=now_iso(),
        objects=[ObjectEntry(data_key[len(job_prefix(job)):], stored.size, stored.sha256)],
        pg_version=pg_version, system_identifier=control.system_identifier,
        timeline=control.timeline, start_lsn=control.checkpoint_lsn,
        uncompressed_size=stream.uncompressed_size,
        extra={"files": stream.files, "format": "tar", "compression": "zstd",
               "recycled_wal_skipped": sum(1 for k in skip if k.count("/") == 1
                                           and k.startswith("pg_wal/"))},
        format=1,
    )
    await put_bytes(store, snapshot_manifest_key(job, sid), v1_manifest_json(manifest))
    return manifest
