"""Incomplete uploads: what an uploader killed mid-object leaves (``.partial`` files, S3
multipart uploads). Nothing ever finishes them, and listings do not show them."""

from __future__ import annotations

from . import Store


async def abort_incomplete(store: Store, *, older_than: float, dry_run: bool = False) -> int:
    """Remove incomplete uploads older than ``older_than`` s; returns how many (a store kind
    without any: 0)."""
    abort = getattr(store, "abort_incomplete", None)
    if abort is None:
        return 0
    return int(await abort(older_than, dry_run=dry_run))
