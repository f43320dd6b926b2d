"""Fork and point-in-time rewind through the API, on the local backend, checked against a
ledger of timestamped commits: each gives exactly the rows committed by the time asked
for, and a fork only reads its source's part of the store."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from jobmesh.agent.store import open_store
from tests.support.mesh import Mesh

pytestmark = pytest.mark.timeout(300)
PW = "pw-123"


async def api(mesh: Mesh, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    token = (mesh.root / "api-token").read_text().strip()
    async with aiohttp.ClientSession() as http, http.request(
            method, f"http://127.0.0.1:{mesh.api_port}{path}", json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=240)) as resp:
        return resp.status, await resp.json()


async def rows(mesh: Mesh, job: str) -> list[int]:
    conn = await asyncpg.connect(mesh.dsn(job, "u", PW), timeout=120)
    try:
        return [r[0] for r in await conn.fetch("SELECT id FROM ledger ORDER BY id")]
    finally:
        await conn.close()


async def write_ledger(mesh: Mesh, job: str, count: int, every: int,
                       first: int = 1) -> list[tuple[int, datetime]]:
    """Commit ids first..first+count-1 one transaction each; every ``every`` ids, the
    server's time after that commit: a mark that splits the ledger exactly there."""
    conn = await asyncpg.connect(mesh.dsn(job, "u", PW), timeout=120)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY,"
                           " at timestamptz NOT NULL DEFAULT clock_timestamp())")
        marks = []
        for i in range(first, first + count):
            await conn.execute("INSERT INTO ledger (id) VALUES ($1)", i)
            if i % every == 0:
                marks.append((i, await conn.fetchval("SELECT clock_timestamp()")))
        return marks
    finally:
        await conn.close()


def store_keys(root: Path, job: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / job).rglob("*") if p.is_file())


async def test_fork_and_rewind_give_the_data_as_of_that_time(mesh: Mesh) -> None:
    mesh.start_controller("--idle-timeout", "0")
    mesh.start_router()
    await mesh.add_user("u", PW, star="write")
    await mesh.create_job("src")
    await mesh.wait_for_base_backup("src")  # what a point-in-time restore starts from
    marks = await write_ledger(mesh, "src", 30, 10)
    await mesh.pause("src")  # its WAL up to the pause is in the store now
    # woken by the writes; then a second pause: a time between the two replays WAL from
    # the first pause snapshot (the next run's WAL continues from its shutdown checkpoint)
    (n35, t35), _ = await write_ledger(mesh, "src", 10, 5, first=31)
    await mesh.pause("src")
    store_root = mesh.root / "store"
    before = store_keys(store_root, "src")

    (n1, t1), (n2, t2), _ = marks
    for new, at, count in (("at-10", t1, n1), ("at-35", t35, n35)):
        status, body = await api(mesh, "POST", "/v1/jobs/src/fork?wait=1&timeout=200",
                                 {"id": new, "at": at.isoformat()})
        assert status == 201, body
        assert body["state"] == "running", body
        assert await rows(mesh, new) == list(range(1, count + 1)), new

    status, body = await api(mesh, "POST", "/v1/jobs/src/fork?wait=1&timeout=200",
                             {"id": "latest"})
    assert status == 201 and body["state"] == "running", body
    assert await rows(mesh, "latest") == list(range(1, 41))
    # the forks only read the source: nothing was added to its part of the store (the
    # controller's retention may have removed WAL older than its oldest snapshot meanwhile)
    assert set(store_keys(store_root, "src")) - set(before) == set()
    job = await mesh.catalog.job("src")
    assert job is not None and job.state == "paused"

    # a time no base backup reaches is a clear refusal, before anything is touched
    status, body = await api(mesh, "POST", "/v1/jobs/src/fork",
                             {"id": "too-early", "at": "2000-01-01T00:00:00Z"})
    assert status == 409 and "earliest reachable time" in body["hint"], body
    assert await mesh.catalog.job("too-early") is None

    status, body = await api(mesh, "POST", "/v1/jobs/src/restore?wait=1&timeout=200",
                             {"at": t2.isoformat()})
    assert status == 200 and body["state"] == "running", body
    assert await rows(mesh, "src") == list(range(1, n2 + 1))
    # the rewound job goes on: it takes writes, and a pause and resume keep them
    conn = await asyncpg.connect(mesh.dsn("src", "u", PW), timeout=120)
    try:
        await conn.execute("INSERT INTO ledger (id) VALUES (1000)")
    finally:
        await conn.close()
    await mesh.pause("src")
    await mesh.catalog.set_desired("src", "running")
    await mesh.wait_state("src", "running")
    assert await rows(mesh, "src") == [*range(1, n2 + 1), 1000]
    # the state the rewind replaced stays in the store, pinned
    pins = list((store_root / "src" / "pins").iterdir())
    assert len(pins) == 1, pins
    store = open_store(f"file://{store_root}")
    try:
        assert await store.size(f"src/snapshots/{pins[0].name.rsplit('.', 1)[0]}"
                                "/manifest.json") is not None
    finally:
        await store.close()
