"""``/v1/store``: garbage collection now, and what each job holds in the store."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from jobmesh.jobids import JOB_ID

from ..storage.keeper import Keeper
from .request import ApiError, fields, json_object, json_response


def store_routes(keeper: Keeper | None) -> list[web.RouteDef]:
    def need() -> Keeper:
        if keeper is None:
            raise ApiError(503, "this controller has no store to collect",
                           "start the controller with --store")
        return keeper

    async def gc(req: web.Request) -> web.Response:
        example = '{"jobs": ["scrape-42"], "dry_run": true}'
        body: dict[str, Any] = await json_object(req, example) if req.can_read_body else {}
        fields(body, example, (), ("jobs", "dry_run"))
        jobs = body.get("jobs")
        if jobs is not None and (not isinstance(jobs, list) or not all(
                isinstance(j, str) and JOB_ID.fullmatch(j) for j in jobs)):
            raise ApiError(400, "'jobs' must be a list of job ids",
                           f"for example {example}; without it, every job")
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError(400, "'dry_run' must be true or false", f"for example {example}")
        report = await need().collect(jobs, dry_run=dry_run)
        return json_response(report.as_dict())

    async def usage(_req: web.Request) -> web.Response:
        jobs = await need().usage()
        return json_response({"jobs": {j: u.as_dict() for j, u in jobs.items()}})

    return [web.post("/v1/store/gc", gc), web.get("/v1/store/usage", usage, allow_head=False)]
