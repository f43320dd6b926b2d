"""The hashes of a PGDATA's files, kept beside them so a pause or a wake need not re-read the disk.

``PGDATA/.jobmesh-hashes`` maps each file to the (size, mtime) it had when
its object names were known, and those names. A file whose size and mtime
are unchanged is taken as unchanged (rsync's and pgBackRest's default):
PostgreSQL is stopped whenever the cache is written (after a restore,
after a pause), and every write it makes later carries a later mtime. A
restore sets each file's mtime to the one its manifest recorded, so a
copy of PGDATA made with ``cp -a`` (the template's spares) keeps a valid
cache. The cache also names the snapshot its files came from: the objects
of that snapshot are in the store (while its manifest is), so a pause
need not ask the store about them.

The cache is only ever a hint: a missing, unreadable or foreign one (other
key file) costs a re-read, never a wrong snapshot.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import Manifest
from ..postgres import give_to_postgres
from ..walnames import parse_lsn

CACHE_NAME = ".jobmesh-hashes"
_FORMAT = 1


@dataclass
class HashCache:
    key_id: str
    source: tuple[str, str] | None = None  # (job, snapshot id) the files were restored from
    files: dict[str, tuple[int, int, list[str]]] = field(default_factory=dict)
    # The checkpoint the files are as of (a pause snapshot's shutdown checkpoint): a
    # relation page whose LSN is not past it has not changed since (see upload.py).
    # 0: unknown (a base backup's files, made consistent by replay).
    lsn: int = 0

    def lookup(self, path: str, size: int, mtime_ns: int) -> list[str] | None:
        hit = self.files.get(path)
        if hit is None or hit[0] != size or hit[1] != mtime_ns:
            return None
        return hit[2]

    @classmethod
    def of(cls, manifest: Manifest) -> HashCache:
        """What a directory holding exactly ``manifest``'s files has."""
        lsn = parse_lsn(manifest.start_lsn) if manifest.kind == "pause" and \
            manifest.start_lsn else 0
        return cls(manifest.key_id, (manifest.job, manifest.id),
                   {f.path: (f.size, f.mtime_ns, list(f.chunks))
                    for f in manifest.files if f.link is None}, lsn)


def read_cache(pgdata: Path, key_id: str) -> HashCache | None:
    try:
        doc = json.loads((pgdata / CACHE_NAME).read_bytes())
        if doc.get("format") != _FORMAT or doc.get("key_id") != key_id:
            return None
        source = tuple(doc["source"]) if doc.get("source") else None
        files = {p: (int(v[0]), int(v[1]), list(v[2])) for p, v in doc["files"].items()}
        lsn = int(doc.get("lsn", 0))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return HashCache(key_id, source if source and len(source) == 2 else None,
                     files, lsn)


def write_cache(pgdata: Path, cache: HashCache) -> None:
    doc = {"format": _FORMAT, "key_id": cache.key_id,
           "source": list(cache.source) if cache.source else None, "lsn": cache.lsn,
           "files": {p: [s, m, c] for p, (s, m, c) in sorted(cache.files.items())}}
    tmp = pgdata / f"{CACHE_NAME}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    give_to_postgres(tmp)
    os.replace(tmp, pgdata / CACHE_NAME)

