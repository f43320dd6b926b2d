"""``jobmesh agent host``: one process that is the agent of many jobs, over its HTTP API.

Real parts: the host as a process (``python -m jobmesh agent host``) on a
file:// store and on moto's S3; PGDATA directories made by ``agent init``
(the agents need no running PostgreSQL to start, ship nothing and answer
their status). What a job's agent does is ``agent serve``'s and tested there
(test_serve.py); this is the host's part: starting and stopping agents by
job, routing a job's API, refusing bad settings, and what it imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from jobmesh.agent.init import init_pgdata
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pgdata(pg_root: Path) -> Path:
    """A PGDATA as ``agent init`` makes it (never started: the agents do not need it)."""
    base = pg_root / f"host-{os.urandom(3).hex()}"
    base.mkdir(mode=0o755)
    init_pgdata(base / "pgdata", "h", spool=base / "spool")
    return base / "pgdata"


class Host:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        async with aiohttp.ClientSession() as http, http.request(
                method, self.url + path, json=body) as resp:
            if resp.content_type != "application/json":
                return resp.status, await resp.text()
            return resp.status, await resp.json()


def _start(tmp_path: Path, store: str) -> tuple[Host, Path]:
    state = tmp_path / "host.json"
    log = tmp_path / "host.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobmesh", "agent", "host", "--no-api-token",
                                 "--store",
                                 store, "--state", str(state)], stdout=out, stderr=out)
    return Host(proc, "", log), state


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    h, state = _start(tmp_path, f"file://{tmp_path / 'store'}")
    try:
        await until(lambda: state.exists() or h.proc.poll() is not None, "the host listening",
                    timeout=60)
        assert h.proc.poll() is None, h.log.read_text()
        h.url = f"http://127.0.0.1:{json.loads(state.read_text())['port']}"
        yield h
    finally:
        h.proc.terminate()
        try:
            h.proc.wait(30)
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait()


def _settings(pgdata: Path, **more: object) -> dict[str, object]:
    return {"pgdata": str(pgdata), "spool": str(pgdata.with_name("spool")),
            "base_backup_interval": 0, "wal_window": 0, **more}


async def test_put_starts_a_jobs_agent_once_and_delete_stops_it(host: Host, pgdata: Path):
    assert await host.call("PUT", "/jobs/a", _settings(pgdata)) == (
        201, {"job": "a", "started": True})
    assert await host.call("PUT", "/jobs/a", _settings(pgdata)) == (
        200, {"job": "a", "started": False})  # the same settings: it runs already
    status, body = await host.call("GET", "/jobs")
    assert status == 200 and [j["job"] for j in body["jobs"]] == ["a"]
    status, body = await host.call("GET", "/jobs/a/status")
    assert status == 200 and body["job"] == "a" and body["postgres"]["running"] is False
    status, text = await host.call("GET", "/jobs/a/metrics")
    assert status == 200 and "jobmesh_agent_wal_segments_uploaded_total 0.0" in text
    assert await host.call("DELETE", "/jobs/a") == (200, {"status": 0})
    assert (await host.call("GET", "/jobs"))[1] == {"jobs": []}
    status, body = await host.call("GET", "/jobs/a/status")
    assert status == 404 and "job a has no agent" in body["error"]
    assert (await host.call("DELETE", "/jobs/a"))[0] == 404


async def test_other_settings_replace_a_running_agent(host: Host, pgdata: Path):
    assert (await host.call("PUT", "/jobs/b", _settings(pgdata, generation=1)))[0] == 201
    assert (await host.call("PUT", "/jobs/b", _settings(pgdata, generation=2)))[1] == {
        "job": "b", "started": True}
    _, body = await host.call("GET", "/jobs")
    assert body["jobs"] == [{"job": "b", "pgdata": str(pgdata), "generation": 2}]
    # Generation 1 is fenced off by 2's claim now: starting it again is refused, in a line.
    status, body = await host.call("PUT", "/jobs/b", _settings(pgdata, generation=1))
    assert status == 409 and "generation" in body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize(("body", "error"), [
    ({"spool": "/tmp/s", "base_backup_interval": 0}, "pgdata: missing"),
    ({"pgdata": "relative", "spool": "/s", "base_backup_interval": 0},
     "pgdata: expected an absolute path"),
    ({"pgdata": "/", "spool": "/s", "base_backup_interval": -1},
     "base_backup_interval: expected a number >= 0"),
    ({"pgdata": "/", "spool": "/s", "base_backup_interval": 0, "colour": 1},
     "unknown agent settings: colour"),
    ({"pgdata": "/", "spool": "/s", "base_backup_interval": 0},
     "/ is not a PostgreSQL data directory"),
    ([], "expected a JSON object of agent settings"),
])
async def test_bad_settings_are_refused_in_one_line(host: Host, body: object, error: str):
    status, answer = await host.call("PUT", "/jobs/c", body)
    assert status == 409 and error in answer["error"]
    assert (await host.call("GET", "/jobs"))[1] == {"jobs": []}


PROBE = """
import asyncio, json, sys
from pathlib import Path
from jobmesh.agent.sidecar.host import AgentHost, config_from_json
from jobmesh.agent.store import open_store

async def main():
    store = open_store(sys.argv[1], s3_endpoint=sys.argv[3] or None)
    host = AgentHost(store)
    body = json.loads(sys.argv[2])
    await host.put(config_from_json("p", body))
    await asyncio.sleep(1)  # its archiver, schedule and history reading have run
    await host.close()
    await store.close()
    print(json.dumps(sorted(sys.modules)))

asyncio.run(main())
"""


def _loaded(store: str, pgdata: Path, endpoint: str = "",
            env: dict[str, str] | None = None) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, store, json.dumps(_settings(pgdata)),
                           endpoint], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_a_file_store_agent_never_imports_the_s3_client(tmp_path: Path, pgdata: Path,
                                                       s3_server) -> None:
    file_agent = _loaded(f"file://{tmp_path / 'store'}", pgdata)
    assert not {m for m in file_agent if m.split(".")[0] in ("aiobotocore", "botocore")}
    # (and the probe can tell: an s3:// agent has them)
    bucket = s3_server.create_bucket(f"host-probe-{os.urandom(3).hex()}")
    s3_agent = _loaded(f"s3://{bucket}/p", pgdata, s3_server.endpoint, s3_server.env)
    assert {"aiobotocore", "botocore"} <= {m.split(".")[0] for m in s3_agent}
