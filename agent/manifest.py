"""Manifests: the record that makes stored objects count, and the store layout.

Layout, under each job's prefix::

    snapshots/<id>/manifest.json     written LAST: without it the snapshot does not exist
    snapshots/<id>/data.tar.zst      format 1 only: PGDATA as a zstd-compressed tar
    wal/<timeline>/<segment>.zst     archived WAL segments
    wal/history/<tli>.history.zst    timeline history files
    wal/partial/<segment>/...        streamed deltas of unfinished segments (walpartial.py)
    generations/<n>.json             incarnations' claims on the prefix (fence.py)
    pins/<snapshot id>.<until>       a snapshot retention keeps until then (a rewind's)
    dumps/<id>.pgdump                pg_dump -Fc
    dumps/<id>.json                  the dump's manifest, written last

and store-wide (names starting with ``_``, which no job id does)::

    _objects/<aa>/<name>             format 2: content-addressed objects (agent/cas)
    _store/keys/<id>.json            the keys objects are named (and sealed) with
    _locks/<id>.json                 leases of writers in flight, and the collector's lock

A format 2 manifest lists every file of PGDATA as the objects (chunks)
holding it; format 1 (one tar per snapshot) is still read.

Snapshot ids sort in time order (``20261126T072300123Z-1a2b``), so "the
latest" is the greatest id that has a manifest. Pure code: no I/O here.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

FORMAT = 2
READABLE = (1, 2)
SnapshotKind = Literal["pause", "base"]


class ManifestError(ValueError):
    pass


def new_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class ObjectEntry:
    key: str  # relative to the job prefix
    size: int
    sha256: str


@dataclass(frozen=True)
class FileEntry:
    """A file of a format 2 snapshot: its objects in order (each ``chunk_size`` bytes of
    plaintext but the last), or ``link`` for a symlink."""

    path: str  # relative to PGDATA, '/'-separated
    size: int
    mode: int
    mtime_ns: int
    chunks: list[str] = field(default_factory=list)
    link: str | None = None


@dataclass(frozen=True)
class DirEntry:
    path: str
    mode: int


@dataclass(frozen=True)
class Manifest:
    """What a snapshot (pause or base backup) or a dump consists of."""

    kind: Literal["pause", "base", "dump"]
    id: str
    job: str
    created_at: str
    objects: list[ObjectEntry]
    pg_version: str = ""
    system_identifier: str = ""
    timeline: int = 0
    start_lsn: str = ""  # base backup: backup start; pause: the shutdown checkpoint
    end_lsn: str = ""  # base backup: backup end (restore must replay WAL up to here)
    start_wal: str = ""  # base backup: first WAL segment needed
    end_wal: str = ""  # base backup: last WAL segment needed for consistency
    uncompressed_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    generation: int = 0  # the incarnation that wrote it (fence.py); 0: unfenced
    files: list[FileEntry] = field(default_factory=list)  # format 2
    dirs: list[DirEntry] = field(default_factory=list)  # format 2
    key_id: str = ""  # format 2: the key file its objects are named with (cas/keys.py)
    chunk_size: int = 0  # format 2
    format: int = FORMAT

    def to_json(self) -> bytes:
        if self.format == 1:
            return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"
        # thousands of file entries: one line each, not twelve (and not through asdict,
        # which deep-copies every list: a tenth of a small job's pause)
        lines = json.dumps(self._head(), indent=2, sort_keys=True)[:-2]
        entries: dict[str, list[dict[str, Any]]] = {
                   "dirs": [{"mode": d.mode, "path": d.path} for d in self.dirs],
                   "files": [{"chunks": f.chunks, "link": f.link, "mode": f.mode,
                              "mtime_ns": f.mtime_ns, "path": f.path, "size": f.size}
                             for f in self.files]}
        for name in ("dirs", "files"):
            rows = ",\n    ".join(json.dumps(r, separators=(",", ":"))
                                  for r in entries[name])
            lines += f',\n  "{name}": [\n    {rows}\n  ]' if rows else f',\n  "{name}": []'
        return (lines + "\n}\n").encode()

    def _head(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("files", "dirs", "objects")}
        out["objects"] = [asdict(o) for o in self.objects]
        return out

    def summary(self) -> dict[str, Any]:
        """The manifest without its file list (what a catalog keeps of a snapshot: the
        list is thousands of entries, and in the store), with its stored size."""
        out = self._head()
        out["file_count"] = len(self.files)
        out["stored_size"] = self.stored_size
        return out

    @property
    def chunked(self) -> bool:
        """Format 2: files as content-addressed objects."""
        return self.format >= 2

    def object_names(self) -> set[str]:
        """Every content-addressed object the snapshot references."""
        return {c for f in self.files for c in f.chunks}

    @property
    def stored_size(self) -> int:
        """Bytes the snapshot added to the store when written (format 1: all of it)."""
        if self.chunked:
            return int(self.extra.get("new_bytes", 0)) + sum(o.size for o in self.objects)
        return sum(o.size for o in self.objects)

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse a stored manifest, or the sidecar's answer to ``POST /pause`` and the like
        (the same JSON); raises ManifestError for anything else."""
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise ManifestError(f"unreadable manifest: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: object) -> Manifest:
        """A manifest from already decoded JSON (e.g. an HTTP client's ``.json()``)."""
        try:
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            if raw.get("format") not in READABLE:
                raise ManifestError(f"unsupported manifest format {raw.get('format')!r} (this "
                                    f"agent reads formats {', '.join(map(str, READABLE))})")
            known = {f.name for f in fields(cls)}
            # Fields a newer agent added are ignored, so that one can read the other's.
            doc = {k: v for k, v in raw.items() if k in known}
            doc["objects"] = [ObjectEntry(**o) for o in raw["objects"]]
            doc["files"] = [FileEntry(**f) for f in raw.get("files", [])]
            doc["dirs"] = [DirEntry(**d) for d in raw.get("dirs", [])]
            return cls(**doc)
        except (ValueError, TypeError, KeyError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"unreadable manifest: {exc}") from exc

    def object(self, key: str) -> ObjectEntry:
        for o in self.objects:
            if o.key == key:
                return o
        raise ManifestError(f"manifest {self.id} has no object {key}")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- layout -----------------------------------------------------------------------


def job_prefix(job: str) -> str:
    return f"{job}/"


def snapshot_data_key(job: str, sid: str) -> str:
    return f"{job}/snapshots/{sid}/data.tar.zst"


def snapshot_manifest_key(job: str, sid: str) -> str:
    return f"{job}/snapshots/{sid}/manifest.json"


def wal_key(job: str, segment: str) -> str:
    """``segment`` is a 24-hex WAL file name; its first 8 digits are the timeline."""
    return f"{job}/wal/{segment[:8]}/{segment}.zst"


def history_key(job: str, name: str) -> str:
    """Timeline history files (``00000002.history``) live beside the segments."""
    return f"{job}/wal/history/{name}.zst"


def pin_key(job: str, sid: str, until: float) -> str:
    return f"{job}/pins/{sid}.{int(until)}"


def pins(keys: list[str], job: str) -> dict[str, float]:
    """Pinned snapshot ids and until when (seconds since the epoch) they are kept."""
    prefix = f"{job}/pins/"
    out: dict[str, float] = {}
    for key in keys:
        sid, _, until = key.removeprefix(prefix).rpartition(".")
        if key.startswith(prefix) and sid and until.isdigit():
            out[sid] = max(out.get(sid, 0.0), float(until))
    return out


def dump_data_key(job: str, did: str) -> str:
    return f"{job}/dumps/{did}.pgdump"


def dump_manifest_key(job: str, did: str) -> str:
    return f"{job}/dumps/{did}.json"


def snapshot_ids_with_manifest(keys: list[str], job: str) -> list[str]:
    """Snapshot ids whose manifest is stored, oldest first."""
    prefix = f"{job}/snapshots/"
    ids = [k[len(prefix):-len("/manifest.json")] for k in keys
           if k.startswith(prefix) and k.endswith("/manifest.json")]
    return sorted(ids)


def dump_ids_with_manifest(keys: list[str], job: str) -> list[str]:
    prefix = f"{job}/dumps/"
    return sorted(k[len(prefix):-len(".json")] for k in keys
                  if k.startswith(prefix) and k.endswith(".json"))
