"""Streaming a directory as a zstd-compressed tar (``create``), and back (``extract``).

Snapshots and base backups are PGDATA-sized (gigabytes), so neither side
ever holds an archive in memory or writes a local copy: a worker thread
walks the tree, writes tar through a multithreaded zstd compressor, and
hands ~1 MiB compressed chunks to the event loop through a bounded queue;
extraction runs the same pipe in reverse. The compressor and the
decompressor release the GIL, so the event loop keeps serving uploads.

Files that change while being read (base backups) are handled in ``create``.
"""

from __future__ import annotations

from .create import TarZstStream, tar_zst_chunks
from .extract import extract_tar_zst, prepare_empty_dir, wipe

__all__ = ["TarZstStream", "extract_tar_zst", "prepare_empty_dir", "tar_zst_chunks", "wipe"]
