"""Format 2 snapshots as tests look at them: the store-wide objects a manifest references."""

from __future__ import annotations

from jobmesh.agent.cas.keys import load_keyring
from jobmesh.agent.cas.objects import OBJECTS_PREFIX, Objects, name_of_key, object_key
from jobmesh.agent.manifest import Manifest
from jobmesh.agent.store import Store


async def stored_object_names(store: Store) -> set[str]:
    """The names of every content-addressed object in the store."""
    return {n for o in await store.list(OBJECTS_PREFIX) if (n := name_of_key(o.key))}


def object_only_in(manifest: Manifest, other: Manifest) -> str:
    """The key of an object ``manifest`` references and ``other`` does not (damaging it
    damages ``manifest`` alone)."""
    names = sorted(manifest.object_names() - other.object_names())
    assert names, f"snapshots {manifest.id} and {other.id} share every object"
    return object_key(names[0])


async def read_snapshot_file(store: Store, manifest: Manifest, path: str) -> bytes:
    """One file's contents as the snapshot holds it, each object verified (no store key)."""
    [entry] = [f for f in manifest.files if f.path == path]
    keyring = await load_keyring(store, create=False)
    objects = Objects(store, keyring.get(manifest.key_id))
    return b"".join([await objects.get(name) for name in entry.chunks])
