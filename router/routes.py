"""The static route file: which job lives where, and who may connect to it.

```toml
[jobs.alpha]              # clients connect with dbname=job_alpha
host = "127.0.0.1"
port = 5433
database = "postgres"     # optional; default job_alpha
user = "postgres"         # the role the router logs in to the backend as
password = "pw"           # optional
max_connections = 100     # optional per-job client limit
pool_mode = "session"     # optional: "session" (the default) or "transaction"
pool_size = 20            # optional: backend connections per router process (default
                          # --pool-size): shared by all clients in transaction mode, kept
                          # idle for the next client in session mode

[users.alice]
password = "s3cret"       # plain text or a SCRAM-SHA-256$... verifier
jobs = ["alpha"]          # job ids, or "*"
admin = false             # optional: write everywhere, every admin console command
stats = false             # optional: the admin console's SHOW commands only
```

Loading validates everything up front and raises ``RouteFileError`` with
the exact key at fault, so a SIGHUP with a broken file changes nothing.

The file is one of two route sources (``route_source.RouteSource``); the
other is the catalog (``catalog_routes``). This module also holds what both
speak in: a ``JobRoute`` (a backend to log in to) and a ``Principal`` (a
verifier and grants). A user listed for a job in the file has write access:
the file names one backend role per job.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from scramp import ScramException

from jobmesh import jobids
from jobmesh.controller.catalog.states import Access
from jobmesh.jobids import is_job_id

from . import errors
from .credentials import InvalidVerifier, ScramVerifier, credential_from_config

PoolMode = Literal["session", "transaction"]
POOL_MODES: tuple[PoolMode, ...] = ("session", "transaction")

JOB_DATABASE_PREFIX = "job_"
ADMIN_DATABASE = "jobmesh"
ADMIN_ALIASES = frozenset({ADMIN_DATABASE, "pgbouncer"})  # (what PgBouncer tools ask for)


class RouteFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class JobRoute:
    job_id: str
    host: str
    port: int
    database: str
    user: str
    password: str | None
    max_connections: int | None
    pool_mode: PoolMode = "session"
    pool_size: int | None = None  # None: the router's --pool-size


@dataclass(frozen=True, slots=True)
class Principal:
    """Someone who may log in: a SCRAM verifier, and grants on job ids or globs."""

    name: str
    verifier: ScramVerifier
    grants: tuple[tuple[str, Access], ...] = ()  # (pattern, access): "alpha", "scrape-*", "*"
    admin: bool = False  # write on every job, and every admin console command
    stats: bool = False  # the admin console's SHOW commands (PgBouncer's stats_users)

    def access(self, job_id: str) -> Access | None:
        """What this principal may do on ``job_id``; when several grants match, write wins."""
        if self.admin:
            return "write"
        found: Access | None = None
        for pattern, access in self.grants:
            if fnmatchcase(job_id, pattern):
                if access == "write":
                    return "write"
                found = access
        return found

    def may_access(self, job_id: str) -> bool:
        return self.access(job_id) is not None


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The static route file as a route source: every job is always running."""

    jobs: dict[str, JobRoute]
    users: dict[str, Principal]

    def job(self, job_id: str) -> JobRoute | None:
        return self.jobs.get(job_id)

    def user(self, name: str) -> Principal | None:
        return self.users.get(name)

    def route(self, job_id: str, access: Access) -> JobRoute | None:
        return self.jobs.get(job_id)

    async def look_again(self, job_id: str) -> JobRoute | None:
        return self.jobs.get(job_id)  # the file is the whole truth until SIGHUP

    async def wake(self, job_id: str, access: Access, notice: Callable[[str], None]) -> JobRoute:
        # route() answers for every job the file names, so nothing is ever woken.
        raise errors.unknown_job(job_id)

    def unreachable(self, job_id: str) -> bool:
        return False  # nobody restarts a route file's servers: the client is told at once


def job_id_from_database(database: str) -> str | None:
    """``job_<id>`` -> ``<id>``; None when the name is not of that form."""
    if not database.startswith(JOB_DATABASE_PREFIX):
        return None
    job_id = database[len(JOB_DATABASE_PREFIX) :]
    return job_id if is_job_id(job_id) else None


def load_routes(path: str | Path) -> RouteTable:
    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise RouteFileError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RouteFileError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise RouteFileError(f"{path}: not UTF-8 text") from exc
    return parse_routes(doc, str(path))


def parse_routes(doc: dict[str, Any], where: str = "routes") -> RouteTable:
    unknown = set(doc) - {"jobs", "users"}
    if unknown:
        raise RouteFileError(f"{where}: unknown section(s): {', '.join(sorted(unknown))}")
    jobs_doc = _table(doc.get("jobs", {}), f"{where}: [jobs]")
    users_doc = _table(doc.get("users", {}), f"{where}: [users]")
    jobs = {job_id: _parse_job(job_id, v, where) for job_id, v in jobs_doc.items()}
    users = {name: _parse_user(name, v, where) for name, v in users_doc.items()}
    return RouteTable(jobs, users)


def _parse_job(job_id: str, raw: Any, where: str) -> JobRoute:
    at = f"{where}: jobs.{job_id}"
    if not is_job_id(job_id):
        raise RouteFileError(f"{at}: {jobids.message(job_id)}")
    t = _table(raw, at)
    _no_unknown(t, {"host", "port", "database", "user", "password", "max_connections",
                    "pool_mode", "pool_size"}, at)
    port = _get(t, "port", int, at, required=True)
    if not 0 < port < 65536:
        raise RouteFileError(f"{at}.port: must be between 1 and 65535")
    limit = _get(t, "max_connections", int, at)
    if limit is not None and limit < 1:
        raise RouteFileError(f"{at}.max_connections: must be at least 1")
    mode = _get(t, "pool_mode", str, at) or "session"
    if mode not in POOL_MODES:
        raise RouteFileError(f'{at}.pool_mode: must be "session" or "transaction"')
    size = _get(t, "pool_size", int, at)
    if size is not None and not 1 <= size <= 10_000:
        raise RouteFileError(f"{at}.pool_size: must be from 1 to 10000")
    return JobRoute(
        job_id=job_id,
        host=_get(t, "host", str, at, required=True),
        port=port,
        database=_get(t, "database", str, at) or f"{JOB_DATABASE_PREFIX}{job_id}",
        user=_get(t, "user", str, at, required=True),
        password=_get(t, "password", str, at),
        max_connections=limit,
        pool_mode=mode,
        pool_size=size,
    )


def _parse_user(name: str, raw: Any, where: str) -> Principal:
    at = f"{where}: users.{name}"
    t = _table(raw, at)
    _no_unknown(t, {"password", "jobs", "admin", "stats"}, at)
    password = _get(t, "password", str, at, required=True)
    try:
        verifier = credential_from_config(password)
    except InvalidVerifier as exc:
        raise RouteFileError(f"{at}.password: {exc}") from exc
    except ScramException as exc:
        raise RouteFileError(f"{at}.password: not usable for SCRAM ({exc})") from exc
    jobs = t.get("jobs", [])
    if jobs == "*":
        jobs = ["*"]
    if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
        raise RouteFileError(f'{at}.jobs: must be a list of job ids or "*"')
    for j in jobs:
        if j != "*" and not is_job_id(j):
            raise RouteFileError(f"{at}.jobs: {j!r} is not a valid job id")
    admin, stats = t.get("admin", False), t.get("stats", False)
    if not isinstance(admin, bool) or not isinstance(stats, bool):
        raise RouteFileError(f"{at}: admin and stats must be true or false")
    return Principal(name, verifier, tuple((j, "write") for j in dict.fromkeys(jobs)),
                     admin=admin, stats=stats)


def _table(raw: Any, at: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RouteFileError(f"{at}: must be a table")
    return raw


def _no_unknown(t: dict[str, Any], known: set[str], at: str) -> None:
    unknown = set(t) - known
    if unknown:
        raise RouteFileError(f"{at}: unknown key(s): {', '.join(sorted(unknown))}")


def _get(t: dict[str, Any], key: str, kind: type, at: str, *, required: bool = False) -> Any:
    value = t.get(key)
    if value is None:
        if required:
            raise RouteFileError(f"{at}.{key}: required")
        return None
    # bool is an int in Python; a port of `true` is still a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RouteFileError(f"{at}.{key}: must be {'an integer' if kind is int else 'a string'}")
    return value
