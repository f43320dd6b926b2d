"""The controller's HTTP API: a real aiohttp server on loopback, a real catalog, real HTTP.

No controller runs here, so job states only change when a test moves them with
``catalog.transition`` (as the reconciler would). Export runs against a real
``jobmesh agent serve`` beside a real PostgreSQL, with a ``file://`` store.

Over ~400 lines on purpose: a list of specifications of one component, one
behaviour per test, sharing this module's fixtures; its helpers live in tests/support.

Over ~400 lines on purpose: one specification per endpoint of one app,
sharing its fixtures (a real server, catalog and agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from jobmesh import jobids
from jobmesh.agent.dump import parse_dump_header
from jobmesh.agent.init import init_pgdata
from jobmesh.agent.manifest import Manifest, dump_manifest_key
from jobmesh.agent.postgres import Instance, free_port
from jobmesh.agent.store import Store, get_bytes, open_store
from jobmesh.controller.api.app import build_app
from jobmesh.controller.api.openapi import document
from jobmesh.controller.catalog.db import Catalog
from jobmesh.router.credentials import parse_verifier
from tests.support.process import LoggedProcess
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(90)

TOKEN = "t0ken-for-tests"
ROUTER = ("127.0.0.1", 6432)


@dataclass
class Api:
    url: str
    http: aiohttp.ClientSession
    state_dir: Path
    catalog: Catalog

    async def call(self, method: str, path: str, *, token: str | None = TOKEN,
                   **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(kwargs.pop("headers", {}))
        async with self.http.request(method, self.url + path, headers=headers,
                                     **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.read()


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[Store]:
    root = tmp_path / "store"
    root.mkdir()
    store = open_store(f"file://{root}")
    yield store
    await store.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application, catalog: Catalog, state: Path) -> AsyncIterator[Api]:
    """``app`` on a free loopback port until the block ends (however it ends)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            yield Api(f"http://127.0.0.1:{port}", http, state, catalog)
    finally:
        await runner.cleanup()


@pytest.fixture
async def api(catalog: Catalog, file_store: Store, tmp_path: Path) -> AsyncIterator[Api]:
    """The API of a controller on the local backend, which enforces no cpu, memory or disk."""
    state = tmp_path / "state"
    state.mkdir()
    app = build_app(catalog, token=TOKEN, store=file_store, state_dir=state, router=ROUTER,
                    backend="local", enforced_limits=frozenset())
    async with serving(app, catalog, state) as api:
        yield api


async def running_job(catalog: Catalog, job_id: str = "alpha", **where: Any) -> None:
    await catalog.create_job(job_id)
    await catalog.transition(job_id, "creating", "running", **where)


async def paused_job(catalog: Catalog, job_id: str = "alpha") -> None:
    await running_job(catalog, job_id)
    await catalog.set_desired(job_id, "paused")
    await catalog.transition(job_id, "running", "paused")


def assert_error(status: int, body: Any, expected: int, text: str = "") -> None:
    assert status == expected, body
    assert set(body) == {"error", "hint"} and body["error"] and body["hint"], body
    assert text in body["error"], body


# --- authentication ------------------------------------------------------------------------


async def test_requests_without_the_token_are_refused_with_401(api: Api) -> None:
    status, body = await api.call("GET", "/v1/jobs", token=None)
    assert_error(status, body, 401, "token")
    status, body = await api.call("POST", "/v1/jobs", token="wrong", json={"id": "x"})
    assert_error(status, body, 401)
    assert await api.catalog.jobs() == []


async def test_401_names_the_bearer_scheme(api: Api) -> None:
    async with api.http.get(api.url + "/v1/status") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_healthz_and_openapi_need_no_token(api: Api) -> None:
    assert await api.call("GET", "/v1/healthz", token=None) == (200, {"status": "ok"})
    status, body = await api.call("GET", "/v1/openapi.json", token=None)
    assert status == 200 and body["openapi"] == "3.1.0"


# --- jobs ------------------------------------------------------------------------------------


async def test_create_job_answers_201_with_the_job_creating(api: Api) -> None:
    status, body = await api.call("POST", "/v1/jobs", json={
        "id": "alpha", "spec": {"archive_timeout": 30, "wal_window": 2.5, "cpu": "500m",
                                "memory": "1Gi"}})
    assert status == 201, body
    assert (body["id"], body["state"], body["desired_state"]) == ("alpha", "creating", "running")
    assert body["spec"] == {"archive_timeout": 30, "wal_window": 2.5, "cpu": "500m",
                            "memory": "1Gi"}
    assert "backend_password" not in body
    job = await api.catalog.job("alpha")
    assert job is not None and job.spec["archive_timeout"] == 30


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"", b"\xff\xfe"])
async def test_a_body_that_is_not_a_json_object_is_a_400(api: Api, raw: bytes) -> None:
    status, body = await api.call("POST", "/v1/jobs", data=raw,
                                  headers={"Content-Type": "application/json"})
    assert_error(status, body, 400)
    assert "JSON" in body["hint"]


@pytest.mark.parametrize("payload, text", [
    ({"id": "Bad Id"}, "bad job id"),
    ({"id": ""}, "'id'"),
    ({"id": 7}, "'id'"),
    ({"name": "alpha"}, "unknown field"),
    ({"id": "alpha", "spec": {"cpus": 2}}, "unknown spec field"),
    ({"id": "alpha", "spec": {"archive_timeout": -1}}, "archive_timeout"),
    ({"id": "alpha", "spec": {"wal_window": -1}}, "wal_window"),
    ({"id": "alpha", "spec": {"wal_window": "5s"}}, "wal_window"),
    ({"id": "alpha", "spec": {"memory": "lots"}}, "memory"),
    ({"id": "alpha", "spec": {"source": {"dump": "/etc/shadow"}}}, "source"),
    ({"id": "alpha", "spec": []}, "spec"),
])
async def test_bad_job_requests_are_400_with_a_hint(api: Api, payload: Any, text: str) -> None:
    status, body = await api.call("POST", "/v1/jobs", json=payload)
    assert_error(status, body, 400, text)
    assert await api.catalog.jobs() == []


async def test_a_bad_job_id_in_the_path_is_a_400(api: Api) -> None:
    status, body = await api.call("GET", "/v1/jobs/Not_Valid")
    assert_error(status, body, 400, "bad job id")


@pytest.mark.parametrize("job_id, why", [("Scrape-42", "ids are lowercase"),
                                         ("a.b", "it contains '.'"),
                                         ("x" * 60, "it is 60 characters long")])
async def test_a_bad_job_id_says_what_is_wrong_and_the_hint_says_the_rule_once(
        api: Api, job_id: str, why: str) -> None:
    status, body = await api.call("POST", "/v1/jobs", json={"id": job_id})
    assert (status, body) == (400, {"error": f"bad job id {job_id!r}: {why}",
                                    "hint": jobids.RULE})
    status, body = await api.call("GET", f"/v1/jobs/{job_id}")
    assert (status, body) == (400, {"error": f"bad job id {job_id!r}: {why}",
                                    "hint": jobids.RULE})


async def test_create_and_show_warn_of_limits_the_backend_does_not_enforce(api: Api) -> None:
    status, body = await api.call("POST", "/v1/jobs", json={
        "id": "alpha", "spec": {"archive_timeout": 5, "cpu": "2", "memory": "1Gi"}})
    warning = {"kind": "unenforced_limits", "backend": "local", "fields": ["memory", "cpu"],
               "message": "the local backend does not enforce memory and cpu: the job runs "
                          "without those limits"}
    assert status == 201 and body["warnings"] == [warning], body
    status, body = await api.call("GET", "/v1/jobs/alpha")
    assert status == 200 and body["warnings"] == [warning]
    status, body = await api.call("POST", "/v1/jobs", json={
        "id": "beta", "spec": {"archive_timeout": 5}})
    assert status == 201 and body["warnings"] == []


async def test_a_backend_that_enforces_the_limits_gives_no_warning(
        catalog: Catalog, tmp_path: Path) -> None:
    app = build_app(catalog, token=TOKEN, backend="kubernetes", agent_key=b"k",
                    enforced_limits=frozenset({"cpu", "memory", "disk"}))
    async with serving(app, catalog, tmp_path) as k8s:
        status, body = await k8s.call("POST", "/v1/jobs", json={
            "id": "alpha", "spec": {"cpu": "2", "memory": "1Gi", "disk": "10Gi"}})
        assert status == 201 and body["warnings"] == [], body


async def test_an_unknown_job_is_a_404(api: Api) -> None:
    for method, path in [("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/pause"),
                         ("DELETE", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events"),
                         ("GET", "/v1/jobs/nope/export")]:
        status, body = await api.call(method, path)
        assert_error(status, body, 404, "no job nope")
        assert "job list" in body["hint"]


async def test_creating_a_job_twice_is_a_409(api: Api) -> None:
    assert (await api.call("POST", "/v1/jobs", json={"id": "alpha"}))[0] == 201
    status, body = await api.call("POST", "/v1/jobs", json={"id": "alpha"})
    assert_error(status, body, 409, "already exists")


async def test_list_jobs(api: Api) -> None:
    await running_job(api.catalog, "b", host="127.0.0.1", port=5999)
    await api.catalog.create_job("a")
    status, body = await api.call("GET", "/v1/jobs")
    assert status == 200
    assert [(j["id"], j["state"], j["port"]) for j in body["jobs"]] == [
        ("a", "creating", None), ("b", "running", 5999)]


async def test_show_job_has_its_snapshots_and_newest_events(api: Api) -> None:
    await running_job(api.catalog)
    await api.catalog.record_snapshot("alpha", {"id": "s1", "kind": "pause", "objects": [
        {"key": "snapshots/s1/data.tar.zst", "size": 10, "sha256": "x"}]})
    status, body = await api.call("GET", "/v1/jobs/alpha")
    assert status == 200 and body["state"] == "running"
    assert [s["id"] for s in body["snapshots"]] == ["s1"]
    assert [(e["kind"], e["to_state"]) for e in body["events"]] == [
        ("created", "creating"), ("transition", "running")]


async def test_pause_without_wait_answers_at_once_with_the_desired_state(api: Api) -> None:
    await running_job(api.catalog)
    status, body = await api.call("POST", "/v1/jobs/alpha/pause")
    assert status == 200 and (body["state"], body["desired_state"]) == ("running", "paused")


async def test_pause_with_wait_answers_once_the_job_is_paused(api: Api) -> None:
    await running_job(api.catalog)
    call = asyncio.create_task(api.call("POST", "/v1/jobs/alpha/pause?wait=1"))
    await until(lambda: _desired(api.catalog, "alpha", "paused"), "desired paused")
    await api.catalog.transition("alpha", "running", "pausing")
    await asyncio.sleep(0.1)
    assert not call.done()  # pausing is not paused
    await api.catalog.transition("alpha", "pausing", "paused")
    status, body = await asyncio.wait_for(call, 5)  # the NOTIFY, not the 5 s re-read
    assert status == 200 and body["state"] == "paused"


async def test_create_with_wait_answers_once_running(api: Api) -> None:
    call = asyncio.create_task(api.call("POST", "/v1/jobs?wait=1", json={"id": "alpha"}))
    await until(lambda: api.catalog.job("alpha"), "the job row")
    await api.catalog.transition("alpha", "creating", "running", host="127.0.0.1", port=5999)
    status, body = await asyncio.wait_for(call, 5)
    assert status == 201 and (body["state"], body["port"]) == ("running", 5999)


async def test_a_wait_that_runs_out_is_a_504_saying_where_the_job_is(api: Api) -> None:
    await running_job(api.catalog)
    await api.catalog.failed_attempt("alpha", "running", "disk full")
    status, body = await api.call("POST", "/v1/jobs/alpha/pause?wait=1&timeout=0.3")
    assert_error(status, body, 504, "still running")
    assert "disk full" in body["error"] and "job show alpha" in body["hint"]


async def test_a_wait_ends_with_409_when_someone_wants_otherwise(api: Api) -> None:
    await running_job(api.catalog)
    call = asyncio.create_task(api.call("POST", "/v1/jobs/alpha/pause?wait=1"))
    await until(lambda: _desired(api.catalog, "alpha", "paused"), "desired paused")
    await api.catalog.transition("alpha", "running", "pausing")
    await api.catalog.set_desired("alpha", "running")  # a client connected meanwhile
    status, body = await asyncio.wait_for(call, 5)
    assert_error(status, body, 409, "now wanted running")


async def test_a_job_shows_its_attempts_and_when_the_next_is_due(api: Api) -> None:
    await api.catalog.create_job("alpha")
    due = datetime.now(UTC) + timedelta(seconds=8)
    await api.catalog.failed_attempt("alpha", "creating", "disk full", next_attempt_at=due)
    status, body = await api.call("GET", "/v1/jobs/alpha")
    assert status == 200
    assert (body["error"], body["attempts"], body["gave_up"]) == ("disk full", 1, False)
    assert datetime.fromisoformat(body["next_attempt_at"]) == due
    _, listed = await api.call("GET", "/v1/jobs")
    assert listed["jobs"][0]["next_attempt_at"] == body["next_attempt_at"]


async def test_a_wait_for_a_job_given_up_on_answers_at_once_with_its_error(api: Api) -> None:
    await api.catalog.create_job("alpha")
    await api.catalog.failed_attempt("alpha", "creating", "cannot import a.pgdump: bad\nmore",
                                     gave_up=True)
    status, body = await asyncio.wait_for(
        api.call("POST", "/v1/jobs/alpha/resume?wait=1&timeout=60"), 5)
    assert_error(status, body, 409, "job alpha: cannot import a.pgdump: bad more")
    assert "will not be retried" in body["hint"]
    assert "`jobmesh job retry alpha`" in body["hint"] and "job delete alpha" in body["hint"]


async def test_a_wait_ends_as_soon_as_the_controller_gives_up(api: Api) -> None:
    call = asyncio.create_task(api.call("POST", "/v1/jobs?wait=1&timeout=60",
                                        json={"id": "alpha"}))
    await until(lambda: api.catalog.job("alpha"), "the job row")
    await asyncio.sleep(0.1)
    assert not call.done()
    await api.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                     gave_up=True)
    status, body = await asyncio.wait_for(call, 5)  # the NOTIFY, not the 5 s re-read
    assert_error(status, body, 409, "job alpha: the dump does not load")


async def test_retry_clears_the_mark_and_with_wait_answers_once_settled(api: Api) -> None:
    await api.catalog.create_job("alpha")
    await api.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                     gave_up=True)
    status, body = await api.call("POST", "/v1/jobs/alpha/retry")
    assert status == 200
    assert (body["gave_up"], body["attempts"], body["state"]) == (False, 0, "creating")
    assert [e.kind for e in await api.catalog.events("alpha", kind="retry")] == ["retry"]
    await api.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                     gave_up=True)
    call = asyncio.create_task(api.call("POST", "/v1/jobs/alpha/retry?wait=1"))
    await until(lambda: _retried(api.catalog, "alpha", 2), "a second retry")
    assert not call.done()
    await api.catalog.transition("alpha", "creating", "running", host="127.0.0.1", port=5999)
    status, body = await asyncio.wait_for(call, 5)
    assert status == 200 and body["state"] == "running"


async def test_retry_of_an_unknown_job_is_a_404(api: Api) -> None:
    status, body = await api.call("POST", "/v1/jobs/nope/retry")
    assert_error(status, body, 404, "no job nope")


async def test_delete_of_a_job_given_up_on_waits_for_the_deletion(api: Api) -> None:
    await api.catalog.create_job("alpha")
    await api.catalog.failed_attempt("alpha", "creating", "the dump does not load",
                                     gave_up=True)
    call = asyncio.create_task(api.call("DELETE", "/v1/jobs/alpha?wait=1"))
    await until(lambda: _desired(api.catalog, "alpha", "deleted"), "desired deleted")
    job = await api.catalog.job("alpha")
    assert job is not None and not job.gave_up  # the wish to delete it is new
    await api.catalog.transition("alpha", "creating", "deleting")
    assert await api.catalog.delete_job_row("alpha")
    assert (await asyncio.wait_for(call, 5))[0] == 204


@pytest.mark.parametrize("query", ["wait=maybe", "wait=1&timeout=0", "wait=1&timeout=x",
                                   "wait=1&timeout=7200"])
async def test_bad_wait_parameters_are_400(api: Api, query: str) -> None:
    await running_job(api.catalog)
    status, body = await api.call("POST", f"/v1/jobs/alpha/pause?{query}")
    assert_error(status, body, 400)
    assert (await api.catalog.job("alpha")).desired_state == "running"  # type: ignore[union-attr]


async def test_resume_of_an_ended_job_is_allowed(api: Api) -> None:
    await running_job(api.catalog)
    await api.call("POST", "/v1/jobs/alpha/end")
    await api.catalog.transition("alpha", "running", "ended")
    status, body = await api.call("POST", "/v1/jobs/alpha/resume")
    assert status == 200 and (body["state"], body["desired_state"]) == ("ended", "running")


async def test_delete_is_202_and_with_wait_204_once_the_row_is_gone(api: Api) -> None:
    await running_job(api.catalog, "a")
    status, body = await api.call("DELETE", "/v1/jobs/a")
    assert status == 202 and body["desired_state"] == "deleted"
    call = asyncio.create_task(api.call("DELETE", "/v1/jobs/a?wait=1"))
    await api.catalog.transition("a", "running", "deleting")
    await asyncio.sleep(0.1)
    assert not call.done()
    assert await api.catalog.delete_job_row("a")
    assert (await asyncio.wait_for(call, 5))[0] == 204


async def test_a_job_being_deleted_cannot_be_paused(api: Api) -> None:
    await running_job(api.catalog)
    await api.call("DELETE", "/v1/jobs/alpha")
    status, body = await api.call("POST", "/v1/jobs/alpha/pause")
    assert_error(status, body, 409, "being deleted")


async def test_events_by_kind_and_limit(api: Api) -> None:
    await paused_job(api.catalog)
    status, body = await api.call("GET", "/v1/jobs/alpha/events?kind=transition")
    assert status == 200
    assert [(e["from_state"], e["to_state"]) for e in body["events"]] == [
        ("creating", "running"), ("running", "paused")]
    status, body = await api.call("GET", "/v1/jobs/alpha/events?limit=1")
    assert [e["to_state"] for e in body["events"]] == ["paused"]
    status, body = await api.call("GET", "/v1/jobs/alpha/events?limit=0")
    assert_error(status, body, 400, "limit")


# --- users and grants ---------------------------------------------------------------------


async def test_a_created_user_has_a_postgres_scram_verifier_for_its_password(api: Api) -> None:
    status, body = await api.call("POST", "/v1/users", json={"name": "ann", "password": "s3cr3t"})
    assert status == 201 and body == {"name": "ann", "admin": False, "stats": False,
                                    "grants": []}
    [row] = await api.catalog.principals("ann")
    assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+",
                        row.verifier)
    verifier = parse_verifier(row.verifier)  # the router's own parser
    assert verifier.matches("s3cr3t") and not verifier.matches("s3cr3T")


async def test_users_list_shows_no_verifiers(api: Api) -> None:
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "x"})
    status, body = await api.call("GET", "/v1/users")
    assert status == 200 and body == {"users": [{"name": "ann", "admin": False, "stats": False,
                                                 "grants": []}]}


@pytest.mark.parametrize("payload, expected, text", [
    ({"name": "bad name", "password": "x"}, 400, "bad user name"),
    ({"name": "ann"}, 400, "'password'"),
    ({"name": "ann", "password": ""}, 400, "'password'"),
    ({"name": "ann", "password": "x", "admin": True}, 400, "unknown field"),
])
async def test_bad_user_requests(api: Api, payload: Any, expected: int, text: str) -> None:
    status, body = await api.call("POST", "/v1/users", json=payload)
    assert_error(status, body, expected, text)


async def test_a_bad_user_name_in_the_path_is_a_400(api: Api) -> None:
    status, body = await api.call("DELETE", "/v1/users/no%20spaces")
    assert_error(status, body, 400, "bad user name")


async def test_user_conflicts_and_deletes(api: Api) -> None:
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "x"})
    status, body = await api.call("POST", "/v1/users", json={"name": "ann", "password": "y"})
    assert_error(status, body, 409, "already exists")
    assert (await api.call("DELETE", "/v1/users/ann"))[0] == 204
    status, body = await api.call("DELETE", "/v1/users/ann")
    assert_error(status, body, 404, "no user ann")


async def test_the_admin_cannot_be_deleted(api: Api) -> None:
    await api.catalog.create_principal("admin", "SCRAM-SHA-256$x", admin=True)
    status, body = await api.call("DELETE", "/v1/users/admin")
    assert_error(status, body, 409, "administrator")


async def test_a_new_password_replaces_the_old_one_as_a_verifier(api: Api) -> None:
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "old"})
    status, body = await api.call("PUT", "/v1/users/ann/password", json={"password": "new"})
    assert (status, body) == (204, b"")
    [row] = await api.catalog.principals("ann")
    assert row.verifier.startswith("SCRAM-SHA-256$")
    verifier = parse_verifier(row.verifier)
    assert verifier.matches("new") and not verifier.matches("old")


@pytest.mark.parametrize("name, payload, expected, text", [
    ("nobody", {"password": "x"}, 404, "no user nobody"),
    ("ann", {"password": ""}, 400, "'password'"),
    ("ann", {"password": "x", "name": "bob"}, 400, "unknown field"),
    ("no%20spaces", {"password": "x"}, 400, "bad user name"),
])
async def test_bad_password_changes(api: Api, name: str, payload: Any, expected: int,
                                    text: str) -> None:
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "old"})
    status, body = await api.call("PUT", f"/v1/users/{name}/password", json=payload)
    assert_error(status, body, expected, text)
    [row] = await api.catalog.principals("ann")
    assert parse_verifier(row.verifier).matches("old")


async def test_the_admins_password_is_not_changed_here_but_in_its_file(api: Api) -> None:
    await api.catalog.create_principal("admin", "SCRAM-SHA-256$x", admin=True)
    status, body = await api.call("PUT", "/v1/users/admin/password", json={"password": "x"})
    assert_error(status, body, 409, f"its password is the file {api.state_dir}/admin-password")
    assert "remove that file" in body["hint"] and "jobmesh up" in body["hint"]
    assert (await api.catalog.principals("admin"))[0].verifier == "SCRAM-SHA-256$x"


async def test_grant_and_revoke_round_trip(api: Api) -> None:
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "x"})
    grant = {"user": "ann", "pattern": "scrape-*", "access": "read"}
    assert await api.call("POST", "/v1/grants", json=grant) == (200, grant)
    upgraded = {**grant, "access": "write"}
    assert await api.call("POST", "/v1/grants", json=upgraded) == (200, upgraded)
    _, body = await api.call("GET", "/v1/users")
    assert body["users"][0]["grants"] == [{"pattern": "scrape-*", "access": "write"}]
    [row] = await api.catalog.principals("ann")
    assert [(g.pattern, g.access) for g in row.grants] == [("scrape-*", "write")]
    assert (await api.call("DELETE", "/v1/grants",
                           json={"user": "ann", "pattern": "scrape-*"}))[0] == 204
    assert (await api.catalog.principals("ann"))[0].grants == ()
    status, body = await api.call("DELETE", "/v1/grants",
                                  json={"user": "ann", "pattern": "scrape-*"})
    assert_error(status, body, 404, "no grant")


@pytest.mark.parametrize("grant, expected, text", [
    ({"user": "nobody", "pattern": "*", "access": "read"}, 404, "no user nobody"),
    ({"user": "ann", "pattern": "*", "access": "admin"}, 400, "access"),
    ({"user": "ann", "pattern": "Bad/Pattern", "access": "read"}, 400, "bad job pattern"),
    ({"user": "ann", "pattern": "*"}, 400, "'access'"),
])
async def test_bad_grants(api: Api, grant: Any, expected: int, text: str) -> None:
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "x"})
    status, body = await api.call("POST", "/v1/grants", json=grant)
    assert_error(status, body, expected, text)


# --- the mesh ------------------------------------------------------------------------------


async def test_status_counts_jobs_by_state_and_shows_the_router(api: Api) -> None:
    await running_job(api.catalog, "a")
    await running_job(api.catalog, "b")
    await api.catalog.create_job("c")
    await api.catalog.set_desired("b", "paused")
    await api.call("POST", "/v1/users", json={"name": "ann", "password": "x"})
    status, body = await api.call("GET", "/v1/status")
    assert status == 200
    assert body["jobs"]["total"] == 3
    assert body["jobs"]["by_state"] == {"creating": 1, "running": 2}
    assert [(j["id"], j["desired_state"]) for j in body["jobs"]["unsettled"]] == [
        ("b", "paused"), ("c", "running")]
    assert body["users"] == 1 and body["router"] == {"host": "127.0.0.1", "port": 6432}


async def test_unknown_paths_and_methods_are_json_errors(api: Api) -> None:
    status, body = await api.call("GET", "/v1/nothing-here")
    assert_error(status, body, 404)
    status, body = await api.call("PUT", "/v1/jobs")
    assert_error(status, body, 405)
    assert "GET" in body["hint"] and "POST" in body["hint"]


def test_the_openapi_document_is_valid_and_describes_every_route() -> None:
    doc = document()
    validate(doc)
    app = build_app(Catalog(None, "postgresql://unused"), token=TOKEN,  # type: ignore[arg-type]
                    agent_key=b"k")
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
              if r.resource is not None}
    described = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes == described
    public = {path for path, item in doc["paths"].items()
              for op in item.values() if op.get("security") == []}
    assert public == {"/v1/healthz", "/v1/openapi.json"}


# --- import --------------------------------------------------------------------------------


async def test_import_stores_the_dump_for_postgres_and_creates_the_job(api: Api) -> None:
    dump = b"PGDMP" + os.urandom(3 << 20)  # several chunks
    status, body = await api.call("POST", "/v1/jobs/beta/import", data=dump)
    assert status == 201, body
    path = api.state_dir / "imports" / "beta.pgdump"
    assert body["state"] == "creating" and body["spec"] == {"source": {"dump": str(path)}}
    assert path.read_bytes() == dump
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert [p.name for p in path.parent.iterdir()] == ["beta.pgdump"]  # no leftovers


async def test_import_of_something_else_is_a_400_and_leaves_nothing(api: Api) -> None:
    status, body = await api.call("POST", "/v1/jobs/beta/import", data=b"SELECT 1;\n" * 10)
    assert_error(status, body, 400, "not a pg_dump")
    assert await api.catalog.job("beta") is None
    assert list((api.state_dir / "imports").iterdir()) == []
    status, body = await api.call("POST", "/v1/jobs/beta/import", data=b"")
    assert_error(status, body, 400, "empty")


async def test_import_over_an_existing_job_is_a_409(api: Api) -> None:
    await running_job(api.catalog, "beta")
    status, body = await api.call("POST", "/v1/jobs/beta/import", data=b"PGDMP...")
    assert_error(status, body, 409, "already exists")
    assert (await api.catalog.job("beta")).spec == {}  # type: ignore[union-attr]


# --- export --------------------------------------------------------------------------------


@dataclass
class ServedJob:
    inst: Instance
    agent_url: str
    store_url: str


JOB = "exp"


@pytest.fixture(scope="module")
def served(pg_root: Path) -> Iterator[ServedJob]:
    """Job ``exp``: its PostgreSQL (with rows) and ``jobmesh agent serve`` on a file store."""
    base = pg_root / f"api-export-{os.urandom(3).hex()}"
    base.mkdir()
    store = base / "store"
    store.mkdir()
    init_pgdata(base / "pgdata", JOB, spool=base / "pgdata.spool", archive_timeout=0)
    inst = Instance(base / "pgdata", port=free_port(), settings={"fsync": "off"})
    inst.start()
    agent = None
    try:
        inst.psql("CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 500) g",
                  database=f"job_{JOB}")
        agent = LoggedProcess("agent", [
            sys.executable, "-m", "jobmesh", "agent", "serve", "--no-api-token",
                "--pgdata", str(inst.datadir),
            "--store", f"file://{store}", "--job", JOB, "--listen", "127.0.0.1:0",
            "--base-backup-interval", "0"])
        port = int(agent.wait_for_log(r"agent listening on http://[\d.]+:(\d+)").group(1))
        yield ServedJob(inst, f"http://127.0.0.1:{port}", f"file://{store}")
    finally:
        if agent is not None:
            agent.stop(timeout=30)
        inst.stop_quietly()


@pytest.fixture
async def export_api(catalog: Catalog, served: ServedJob, tmp_path: Path
                     ) -> AsyncIterator[tuple[Api, Store]]:
    """The API exporting through the agent's own store."""
    store = open_store(served.store_url)
    app = build_app(catalog, token=TOKEN, store=store, state_dir=tmp_path)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        async with aiohttp.ClientSession() as http:
            yield Api(f"http://127.0.0.1:{runner.addresses[0][1]}", http, tmp_path,
                      catalog), store
    finally:
        await runner.cleanup()
        await store.close()


async def _export(api: Api, path: str) -> tuple[int, dict[str, str], bytes]:
    async with api.http.get(api.url + path,
                            headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_export_streams_a_fresh_dump_with_its_length_and_sha256(
        export_api: tuple[Api, Store], served: ServedJob) -> None:
    api, store = export_api
    await running_job(api.catalog, JOB, host="127.0.0.1", port=served.inst.port,
                      agent_url=served.agent_url)
    status, headers, body = await _export(api, f"/v1/jobs/{JOB}/export")
    assert status == 200, body
    assert int(headers["Content-Length"]) == len(body)
    assert headers["X-Jobmesh-Sha256"] == hashlib.sha256(body).hexdigest()
    header = parse_dump_header(body)
    assert header is not None and header.database == f"job_{JOB}"
    manifest = Manifest.from_json(
        await get_bytes(store, dump_manifest_key(JOB, headers["X-Jobmesh-Dump-Id"])))
    assert manifest.objects[0].sha256 == headers["X-Jobmesh-Sha256"]
    [event] = await api.catalog.events(JOB, kind="exported")
    assert event.bytes == len(body)


async def test_export_of_a_paused_job_wakes_it_first(
        export_api: tuple[Api, Store], served: ServedJob) -> None:
    api, _ = export_api
    await paused_job(api.catalog, JOB)
    call = asyncio.create_task(_export(api, f"/v1/jobs/{JOB}/export"))
    await until(lambda: _desired(api.catalog, JOB, "running"), "a wake request")
    assert [e.kind for e in await api.catalog.events(JOB, kind="wake-requested")]
    await api.catalog.transition(JOB, "paused", "resuming")
    await api.catalog.transition(JOB, "resuming", "running", host="127.0.0.1",
                                 port=served.inst.port, agent_url=served.agent_url)
    status, _headers, body = await asyncio.wait_for(call, 60)
    assert status == 200 and body.startswith(b"PGDMP")


async def test_export_when_the_agent_is_unreachable_is_a_502(
        export_api: tuple[Api, Store]) -> None:
    api, _ = export_api
    await running_job(api.catalog, JOB, agent_url=f"http://127.0.0.1:{free_port()}")
    status, _headers, body = await _export(api, f"/v1/jobs/{JOB}/export")
    assert status == 502 and b"cannot reach the agent" in body


async def test_export_of_an_ended_job_is_a_409(export_api: tuple[Api, Store]) -> None:
    api, _ = export_api
    await running_job(api.catalog, JOB)
    await api.catalog.set_desired(JOB, "ended")
    await api.catalog.transition(JOB, "running", "ended")
    status, _headers, body = await _export(api, f"/v1/jobs/{JOB}/export")
    assert status == 409 and b"resume it first" in body


async def _retried(catalog: Catalog, job_id: str, times: int) -> bool:
    return len(await catalog.events(job_id, kind="retry")) >= times


async def _desired(catalog: Catalog, job_id: str, desired: str) -> bool:
    job = await catalog.job(job_id)
    return job is not None and job.desired_state == desired
