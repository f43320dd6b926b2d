"""Generations and the fenced store, on a real ``file://`` store."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobmesh.agent.fence import (
    Fenced,
    FencedStore,
    claim,
    claim_key,
    claimed,
    parse_claim_key,
    superseded,
)
from jobmesh.agent.store import get_bytes, open_store, put_bytes

pytestmark = pytest.mark.timeout(30)


def test_a_claim_key_names_its_generation() -> None:
    assert claim_key("j", 7) == "j/generations/000000000007.json"
    assert parse_claim_key("j", claim_key("j", 7)) == 7
    assert parse_claim_key("j", "j/generations/x.json") is None
    assert parse_claim_key("j", "k/generations/000000000007.json") is None


async def test_claims_are_idempotent_and_a_newer_one_refuses_an_older(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    assert await claim(store, "j", 1) == []
    assert await claim(store, "j", 1) == []  # the same incarnation, restarted
    assert await claim(store, "j", 3) == [1]  # gaps are fine: a launch that failed early
    with pytest.raises(Fenced, match="generation 2 is fenced off: generation 3"):
        await claim(store, "j", 2)
    assert await claimed(store, "j") == [1, 3]
    assert b'"generation": 3' in await get_bytes(store, claim_key("j", 3))


def test_a_snapshot_is_superseded_when_an_incarnation_started_after_it() -> None:
    assert not superseded(4, [1, 2, 4])  # its own incarnation was the last
    assert superseded(4, [1, 2, 4, 5])  # generation 5 ran from it, and may still run
    assert not superseded(0, [7])  # unfenced snapshots: nothing to tell
    assert not superseded(3, [])


async def test_a_fenced_store_refuses_every_write_once_a_newer_claim_appears(
        tmp_path: Path) -> None:
    inner = open_store(f"file://{tmp_path}")
    await claim(inner, "j", 1)
    seen: list[Fenced] = []
    store = FencedStore(inner, "j", 1, interval=3600, on_fenced=seen.append)
    await put_bytes(store, "j/wal/partial/x.zst", b"a")
    await put_bytes(store, "j/snapshots/s1/manifest.json", b"{}")  # looks: nothing newer
    await claim(inner, "j", 2)
    await put_bytes(store, "j/wal/partial/y.zst", b"b")  # within the interval: not looked
    with pytest.raises(Fenced):
        await put_bytes(store, "j/snapshots/s2/manifest.json", b"{}")  # a manifest looks
    with pytest.raises(Fenced):
        await put_bytes(store, "j/wal/partial/z.zst", b"c")  # fenced: nothing more
    with pytest.raises(Fenced):
        await store.delete_many(["j/wal/partial/x.zst"])
    assert len(seen) == 1 and seen[0].newer == 2
    assert await inner.size("j/snapshots/s2/manifest.json") is None
    assert await inner.size("j/wal/partial/x.zst") == 1  # reading still works, nothing gone


async def test_a_fenced_store_looks_before_uploads_once_the_interval_passed(
        tmp_path: Path) -> None:
    inner = open_store(f"file://{tmp_path}")
    await claim(inner, "j", 1)
    store = FencedStore(inner, "j", 1, interval=0)
    await put_bytes(store, "j/wal/partial/x.zst", b"a")
    await claim(inner, "j", 2)
    with pytest.raises(Fenced):
        await put_bytes(store, "j/wal/partial/y.zst", b"b")
    with pytest.raises(Fenced):
        await store.delete("j/wal/partial/x.zst")
