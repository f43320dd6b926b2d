"""The API's OpenAPI 3.1 document, as data (served at ``GET /v1/openapi.json``).

Kept beside the handlers by hand rather than generated from them: a test
checks that every route of the app is described here and nothing else is.

At ~400 lines it is one document: the schemas and the paths beside each other,
checked whole against the app's routes by one test.
"""

from __future__ import annotations

from typing import Any

from jobmesh import jobids

from ..catalog.states import ACCESS, DesiredState, JobState
from .request import LIMITS

JSON = "application/json"
JOB_ID_PATTERN = f"^{jobids.JOB_ID.pattern}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 409: "Conflict",
             502: "BadGateway", 503: "Unavailable", 504: "Timeout"}
    return {str(c): {"$ref": f"#/components/responses/{names[c]}"} for c in (401, *codes)}


def _op(op_id: str, summary: str, responses: dict[str, Any], *,
        params: tuple[str, ...] = (), body: dict[str, Any] | None = None,
        public: bool = False, tags: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": list(tags),
                          "responses": responses}
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    if body is not None:
        op["requestBody"] = body
    if public:
        op["security"] = []
    return op


def _action(verb: str, desired: DesiredState) -> dict[str, Any]:
    return {"post": _op(
        f"{verb}Job", f"{verb.capitalize()} a job: want it {desired}; with ?wait=1, answer "
        f"once it is {desired}",
        {"200": _body(_ref("Job"), f"the job (with ?wait=1: {desired})"),
         **_errors(400, 404, 409, 504)},
        params=("JobId", "Wait", "Timeout"), tags=("jobs",))}


def _warnings() -> dict[str, Any]:
    return {"type": "array", "items": _ref("Warning")}


def _schemas() -> dict[str, Any]:
    text = {"type": "string"}
    nullable_text = {"type": ["string", "null"]}
    stamp = {"type": "string", "format": "date-time"}
    return {
        "Error": {"type": "object", "required": ["error", "hint"],
                  "properties": {"error": text, "hint": text}},
        "JobSpec": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "archive_timeout": {"type": "integer", "minimum": 0,
                                    "description": "seconds: forces a WAL segment switch"},
                "wal_window": {"type": "number", "minimum": 0, "maximum": 86400,
                               "description": "seconds: streamed WAL is sent this often; "
                                              "bounds what a lost machine loses"},
                "keep_pauses": {"type": "integer", "minimum": 1, "maximum": 1000,
                                "description": "pause snapshots kept (default 3)"},
                "pitr_window": {"type": "number", "minimum": 0, "maximum": 7776000,
                                "description": "seconds: how far back a point-in-time "
                                               "restore can aim (default a day)"},
                "pool_mode": {"enum": ["session", "transaction"],
                              "description": "how the router pools the job's server "
                                             "connections (default session)"},
                "pool_size": {"type": "integer", "minimum": 1, "maximum": 10000,
                              "description": "server connections per router process "
                                             "(default the router's --pool-size)"},
                "max_connections": {"type": "integer", "minimum": 1, "maximum": 100000,
                                    "description": "client connections through all the "
                                                   "routers together (default no limit)"},
                "cpu": {"type": ["string", "number"], "examples": ["500m", 2]},
                "memory": {"type": "string", "examples": ["1Gi"]},
                "disk": {"type": "string", "examples": ["10Gi"]}}},
        "JobCreate": {"type": "object", "required": ["id"], "additionalProperties": False,
                      "properties": {"id": {"type": "string", "pattern": JOB_ID_PATTERN,
                                            "maxLength": jobids.MAX_LENGTH},
                                     "spec": _ref("JobSpec")}},
        "JobUpdate": {"type": "object", "required": ["spec"], "additionalProperties": False,
                      "properties": {"spec": {
                          "type": "object", "additionalProperties": False, "minProperties": 1,
                          "properties": {"pool_mode": {"enum": ["session", "transaction"]},
                                         "pool_size": {"type": "integer", "minimum": 1,
                                                       "maximum": 10000},
                                         "max_connections": {"type": "integer", "minimum": 1,
                                                             "maximum": 100000}}}}},
        "Job": {
            "type": "object",
            "required": ["id", "state", "desired_state", "spec", "attempts", "gave_up",
                         "created_at"],
            "properties": {
                "id": text, "state": {"enum": [s.value for s in JobState]},
                "desired_state": {"enum": [s.value for s in DesiredState]},
                "host": nullable_text, "port": {"type": ["integer", "null"]},
                "agent_url": nullable_text,
                "spec": {"type": "object", "description": "JobSpec, plus 'source' for imports"},
                "progress": nullable_text,
                "error": {"type": ["string", "null"],
                          "description": "why the last attempt failed (kept until one succeeds)"},
                "attempts": {"type": "integer",
                             "description": "failed attempts of the current transition"},
                "next_attempt_at": {"type": ["string", "null"], "format": "date-time",
                                    "description": "when the failed transition is tried "
                                                   "again (null: no retry due)"},
                "gave_up": {"type": "boolean",
                            "description": "the error is one retrying cannot fix: nothing is "
                                           "tried until POST /v1/jobs/{id}/retry, a new "
                                           "desired state, or a delete"},
                "generation": {"type": "integer", "minimum": 0,
                               "description": "the newest incarnation's number: each create, "
                                              "wake and recovery takes the next one, and its "
                                              "agent claims it in the store, fencing off any "
                                              "older incarnation still running"},
                "last_active": stamp, "created_at": stamp, "updated_at": stamp}},
        "Snapshot": {"type": "object", "properties": {
            "id": text, "kind": text, "size_bytes": {"type": ["integer", "null"]},
            "stored_bytes": {"type": ["integer", "null"]}, "created_at": stamp}},
        "Event": {"type": "object", "required": ["id", "job_id", "at", "kind"], "properties": {
            "id": {"type": "integer"}, "job_id": nullable_text, "at": stamp, "kind": text,
            "actor": {"type": ["string", "null"],
                      "description": "who asked: a principal's name, or api (the API token)"},
            "from_state": nullable_text, "to_state": nullable_text,
            "duration_ms": {"type": ["number", "null"]}, "bytes": {"type": ["integer", "null"]},
            "detail": {"type": "object"}}},
        "Warning": {
            "type": "object", "required": ["kind", "message"],
            "description": "something the job asked for that it does not get",
            "properties": {
                "kind": {"enum": ["unenforced_limits"]},
                "backend": {"type": "string", "examples": ["local"]},
                "fields": {"type": "array", "items": {"enum": list(LIMITS)},
                           "description": "the spec's limits this controller's backend "
                                          "does not enforce: the job runs without them"},
                "message": text}},
        "JobCreated": {"allOf": [_ref("Job"), {"type": "object", "required": ["warnings"],
                                               "properties": {"warnings": _warnings()}}]},
        "JobDetail": {"allOf": [_ref("Job"), {"type": "object", "properties": {
            "warnings": _warnings(),
            "snapshots": {"type": "array", "items": _ref("Snapshot")},
            "events": {"type": "array", "items": _ref("Event"),
                       "description": "the newest 20, oldest first"}}}]},
        "JobList": {"type": "object", "required": ["jobs"],
                    "properties": {"jobs": {"type": "array", "items": _ref("Job")}}},
        "EventList": {"type": "object", "required": ["events"],
                      "properties": {"events": {"type": "array", "items": _ref("Event")}}},
        "GrantEntry": {"type": "object", "properties": {
            "pattern": text, "access": {"enum": list(ACCESS)}}},
        "User": {"type": "object", "required": ["name", "admin", "grants"], "properties": {
            "name": text, "admin": {"type": "boolean"},
            "stats": {"type": "boolean",
                      "description": "may only SHOW in the router's admin console"},
            "grants": {"type": "array", "items": _ref("GrantEntry")}}},
        "UserCreate": {"type": "object", "required": ["name", "password"],
                       "additionalProperties": False,
                       "properties": {"name": text, "password": {"type": "string",
                                                                 "minLength": 1},
                                      "stats": {"type": "boolean"}}},
        "UserPassword": {"type": "object", "required": ["password"],
                         "additionalProperties": False,
                         "properties": {"password": {"type": "string", "minLength": 1}}},
        "UserList": {"type": "object", "required": ["users"],
                     "properties": {"users": {"type": "array", "items": _ref("User")}}},
        "Grant": {"type": "object", "required": ["user", "pattern", "access"],
                  "additionalProperties": False,
                  "properties": {"user": text,
                                 "pattern": {"type": "string", "examples": ["scrape-*", "*"]},
                                 "access": {"enum": list(ACCESS)}}},
        "Revoke": {"type": "object", "required": ["user", "pattern"],
                   "additionalProperties": False,
                   "properties": {"user": text, "pattern": text}},
        "Status": {"type": "object", "required": ["jobs", "users", "router"], "properties": {
            "jobs": {"type": "object", "properties": {
                "total": {"type": "integer"},
                "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                "unsettled": {"type": "array", "items": {"type": "object"},
                              "description": "jobs whose state is not (yet) the desired one"}}},
            "users": {"type": "integer"},
            "router": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                "host": text, "port": {"type": "integer"}}}]}}},
        "JobFork": {"type": "object", "required": ["id"], "additionalProperties": False,
                    "properties": {"id": {"type": "string", "pattern": JOB_ID_PATTERN},
                                   "at": {"type": "string", "examples":
                                          ["2026-12-01T10:00:00Z"]}}},
        "JobRestore": {"type": "object", "required": ["at"], "additionalProperties": False,
                       "properties": {"at": {"type": "string", "examples":
                                             ["2026-12-01T10:00:00Z"]}}},
        "GcRequest": {"type": "object", "additionalProperties": False, "properties": {
            "jobs": {"type": "array", "items": {"type": "string", "pattern": JOB_ID_PATTERN}},
            "dry_run": {"type": "boolean"}}},
        "GcReport": {"type": "object", "properties": {
            "jobs": {"type": "integer"}, "objects": {"type": "integer"},
            "referenced": {"type": "integer"},
            "dropped_snapshots": {"type": "array", "items": text},
            "deleted_keys": {"type": "integer"}, "deleted_objects": {"type": "integer"},
            "deleted_bytes": {"type": "integer"}, "incomplete": {"type": "integer"},
            "deferred": text, "dry_run": {"type": "boolean"}}},
        "StoreUsage": {"type": "object", "required": ["jobs"], "properties": {
            "jobs": {"type": "object", "additionalProperties": {
                "type": "object", "properties": {k: {"type": "integer"} for k in (
                    "snapshots", "unique", "shared", "wal", "other")}}}}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"enum": ["ok", "unavailable"]},
                                  "catalog": text}},
    }


def _parameters() -> dict[str, Any]:
    return {
        "JobId": {"name": "id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": JOB_ID_PATTERN}},
        "UserName": {"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string"}},
        "Wait": {"name": "wait", "in": "query", "required": False,
                 "description": "1: answer only once the job reached the wanted state",
                 "schema": {"enum": ["0", "1", "true", "false", "yes", "no"]}},
        "Timeout": {"name": "timeout", "in": "query", "required": False,
                    "description": "seconds to wait (default 300, at most 3600); then 504",
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600}},
        "Limit": {"name": "limit", "in": "query", "required": False,
                  "schema": {"type": "integer", "minimum": 1, "maximum": 10000,
                             "default": 100}},
        "JobFilter": {"name": "job", "in": "query", "required": False,
                      "description": "only this job's events",
                      "schema": {"type": "string", "pattern": JOB_ID_PATTERN}},
        "Kind": {"name": "kind", "in": "query", "required": False,
                 "description": "only events of this kind (transition, wake-requested, ...)",
                 "schema": {"type": "string"}},
    }


def _responses() -> dict[str, Any]:
    def err(text: str) -> dict[str, Any]:
        return _body(_ref("Error"), text)

    return {
        "BadRequest": err("the request is malformed: bad JSON, a bad id or field"),
        "Unauthorized": err("the bearer token is missing or wrong"),
        "NotFound": err("no such job, user or grant"),
        "Conflict": err("it exists already, or the job's state does not allow this, or "
                        "(?wait=1) the controller gave up on the job: a failure retrying "
                        "cannot fix"),
        "BadGateway": err("the job's agent failed or cannot be reached"),
        "Unavailable": err("the catalog is unreachable, or the controller lacks a store"),
        "Timeout": err("the job did not reach the wanted state in time; work goes on"),
    }


def _paths() -> dict[str, Any]:
    job = _ref("Job")
    return {
        "/v1/healthz": {"get": _op(
            "health", "Is the API up and its catalog reachable?",
            {"200": _body(_ref("Health"), "ok"), "503": _body(_ref("Health"), "unavailable")},
            public=True, tags=("mesh",))},
        "/v1/openapi.json": {"get": _op(
            "openapi", "This document", {"200": _body({"type": "object"}, "OpenAPI 3.1")},
            public=True, tags=("mesh",))},
        "/v1/status": {"get": _op(
            "status", "Jobs by state, users, and where the router listens",
            {"200": _body(_ref("Status"), "the mesh"), **_errors()}, tags=("mesh",))},
        "/v1/jobs": {
            "get": _op("listJobs", "All jobs", {"200": _body(_ref("JobList"), "the jobs"),
                                                **_errors()}, tags=("jobs",)),
            "post": _op(
                "createJob", "Create a job (state creating); ?wait=1 answers once running",
                {"201": _body(_ref("JobCreated"), "the new job, with warnings about what "
                              "its spec asks for that the backend does not enforce"),
                 **_errors(400, 409, 504)},
                params=("Wait", "Timeout"), body={"required": True, "content": {
                    JSON: {"schema": _ref("JobCreate")}}}, tags=("jobs",))},
        "/v1/jobs/{id}": {
            "get": _op("showJob", "A job with its snapshots and newest events",
                       {"200": _body(_ref("JobDetail"), "the job"), **_errors(400, 404)},
                       params=("JobId",), tags=("jobs",)),
            "patch": _op("updateJob", "Change a job's router settings (pool_mode, "
                         "pool_size, max_connections); new connections use them",
                         {"200": _body(job, "the job, updated"), **_errors(400, 404)},
                         params=("JobId",), body={"required": True, "content": {
                             JSON: {"schema": _ref("JobUpdate")}}}, tags=("jobs",)),
            "delete": _op(
                "deleteJob", "Delete a job and its stored data; ?wait=1 answers once gone",
                {"202": _body(job, "deletion requested"),
                 "204": {"description": "deleted (with ?wait=1)"}, **_errors(400, 404, 504)},
                params=("JobId", "Wait", "Timeout"), tags=("jobs",))},
        "/v1/jobs/{id}/pause": _action("pause", DesiredState.PAUSED),
        "/v1/jobs/{id}/resume": _action("resume", DesiredState.RUNNING),
        "/v1/jobs/{id}/end": _action("end", DesiredState.ENDED),
        "/v1/jobs/{id}/retry": {"post": _op(
            "retryJob", "Try again now what the controller gave up on (or is waiting to "
            "retry); with ?wait=1, answer once the job is what it is wanted to be",
            {"200": _body(job, "the job (with ?wait=1: settled)"),
             **_errors(400, 404, 409, 504)},
            params=("JobId", "Wait", "Timeout"), tags=("jobs",))},
        "/v1/jobs/{id}/fork": {"post": _op(
            "forkJob", "Create a job from this one's data, latest or as of a time within "
            "its point-in-time window, sharing its snapshot objects (the source is only "
            "read); with ?wait=1, answer once the new job runs",
            {"201": _body(job, "the new job"), **_errors(400, 404, 409, 504)},
            params=("JobId", "Wait", "Timeout"),
            body={"required": True, "content": {JSON: {"schema": _ref("JobFork")}}},
            tags=("jobs",))},
        "/v1/jobs/{id}/restore": {"post": _op(
            "restoreJob", "Rewind the job to a time within its point-in-time window: it is "
            "paused, its state pinned as a snapshot for the window, then resumed from the "
            "base backup and WAL up to that time; with ?wait=1, answer once it runs again",
            {"200": _body(job, "the job"), **_errors(400, 404, 409, 503, 504)},
            params=("JobId", "Wait", "Timeout"),
            body={"required": True, "content": {JSON: {"schema": _ref("JobRestore")}}},
            tags=("jobs",))},
        "/v1/store/gc": {"post": _op(
            "collectGarbage", "Apply every job's retention (or the listed jobs') and delete "
            "the objects no kept snapshot references, now",
            {"200": _body(_ref("GcReport"), "what was (or, dry, would be) removed"),
             **_errors(400, 503)},
            body={"required": False, "content": {JSON: {"schema": _ref("GcRequest")}}},
            tags=("store",))},
        "/v1/store/usage": {"get": _op(
            "storeUsage", "What each job holds in the store: unique and shared object bytes, "
            "WAL, other",
            {"200": _body(_ref("StoreUsage"), "bytes per job"), **_errors(503)},
            tags=("store",))},
        "/v1/events": {"get": _op(
            "meshEvents", "Every event, oldest first: the mesh's own (logins, users, grants) "
            "and every job's, with who acted (actor) where someone did",
            {"200": _body(_ref("EventList"), "the events"), **_errors(400, 404)},
            params=("JobFilter", "Limit", "Kind"), tags=("jobs",))},
        "/v1/jobs/{id}/events": {"get": _op(
            "jobEvents", "A job's events, oldest first",
            {"200": _body(_ref("EventList"), "the events"), **_errors(400, 404)},
            params=("JobId", "Limit", "Kind"), tags=("jobs",))},
        "/v1/jobs/{id}/export": {"get": _op(
            "exportJob", "A fresh pg_dump -Fc of the job (woken first if paused), streamed",
            {"200": {"description": "the dump", "headers": {
                "Content-Length": {"schema": {"type": "integer"}},
                "X-Jobmesh-Dump-Id": {"schema": {"type": "string"}},
                "X-Jobmesh-Sha256": {"description": "sha256 of the body, hex",
                                     "schema": {"type": "string"}}},
                "content": {"application/octet-stream": {
                    "schema": {"type": "string", "contentMediaType":
                               "application/octet-stream"}}}},
             **_errors(400, 404, 409, 502, 503, 504)},
            params=("JobId", "Timeout"), tags=("jobs",))},
        "/v1/jobs/{id}/import": {"post": _op(
            "importJob", "Create a job from a pg_dump -Fc archive (the request body)",
            {"201": _body(job, "the new job"), **_errors(400, 409, 503, 504)},
            params=("JobId", "Wait", "Timeout"),
            body={"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string",
                           "contentMediaType": "application/octet-stream"}}}},
            tags=("jobs",))},
        "/v1/users": {
            "get": _op("listUsers", "Users and their grants",
                       {"200": _body(_ref("UserList"), "the users"), **_errors()},
                       tags=("users",)),
            "post": _op("createUser", "Create a user (the password is kept as a SCRAM "
                        "verifier only)", {"201": _body(_ref("User"), "the new user"),
                                           **_errors(400, 409)},
                        body={"required": True, "content": {
                            JSON: {"schema": _ref("UserCreate")}}}, tags=("users",))},
        "/v1/users/{name}": {"delete": _op(
            "deleteUser", "Delete a user and its grants",
            {"204": {"description": "deleted"}, **_errors(400, 404, 409)},
            params=("UserName",), tags=("users",))},
        "/v1/users/{name}/password": {"put": _op(
            "setUserPassword", "Give a user a new password (kept as a SCRAM verifier only); "
            "the administrator's is refused (409): `jobmesh up` keeps it in "
            "<state-dir>/admin-password",
            {"204": {"description": "changed"}, **_errors(400, 404, 409)},
            params=("UserName",), body={"required": True, "content": {
                JSON: {"schema": _ref("UserPassword")}}}, tags=("users",))},
        "/v1/grants": {
            "post": _op("grant", "Let a user reach the jobs matching a pattern",
                        {"200": _body(_ref("Grant"), "the grant"), **_errors(400, 404)},
                        body={"required": True, "content": {JSON: {"schema": _ref("Grant")}}},
                        tags=("users",)),
            "delete": _op("revoke", "Take a grant away",
                          {"204": {"description": "revoked"}, **_errors(400, 404)},
                          body={"required": True,
                                "content": {JSON: {"schema": _ref("Revoke")}}},
                          tags=("users",))},
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobmesh controller API", "version": "1",
                 "description": "Jobs (each its own PostgreSQL), their export and import, "
                                "users and grants. Errors are {error, hint}."},
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "the token in <state-dir>/api-token"}},
            "schemas": _schemas(), "parameters": _parameters(), "responses": _responses()},
    }
