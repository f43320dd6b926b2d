"""What a client's StartupMessage asks for, checked before authentication (sans-IO).

The router serves ``dbname=job_<id>`` only; everything else in the startup
packet is either the router's business (``user``, ``database``,
``replication``) or passed on to the backend as the client's own session
settings (``application_name``, ``options``, ``DateStyle``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import errors
from . import protocol as pg
from .errors import ClientError
from .routes import ADMIN_DATABASE, JOB_DATABASE_PREFIX, job_id_from_database

# Startup parameters that are the router's business, not the backend's.
_NOT_FORWARDED = {"user", "database", "replication"}


@dataclass(frozen=True, slots=True)
class Startup:
    user: str
    job_id: str
    forwarded: dict[str, str]  # for the backend's StartupMessage
    negotiate: bytes | None  # a NegotiateProtocolVersion to send first, if any


def read_startup(startup: pg.StartupMessage) -> Startup:
    """The client's request, or the ClientError that refuses it."""
    params = dict(startup.params)
    user = params.get("user", "")
    if not user:
        raise ClientError("28000", "no PostgreSQL user name specified in startup packet")
    database = params.get("database") or user
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise ClientError(
            "0A000",
            "replication connections are not supported through the router",
            "Connect to the job's PostgreSQL directly for replication.",
        )
    if database == ADMIN_DATABASE:
        raise ClientError(
            "3D000",
            'the admin console database "jobmesh" is not available on this router',
            "Connect with dbname=job_<id>.",
        )
    job_id = job_id_from_database(database)
    if job_id is None:
        if database.startswith(JOB_DATABASE_PREFIX):
            raise errors.bad_job_id(database, database[len(JOB_DATABASE_PREFIX) :])
        raise errors.invalid_database(database)
    unsupported = [k for k in params if k.startswith("_pq_.")]
    negotiate = None
    if startup.minor > 0 or unsupported:
        negotiate = pg.negotiate_protocol_version(pg.PROTOCOL_3_0, unsupported)
    forwarded = {
        k: v for k, v in params.items() if k not in _NOT_FORWARDED and k not in unsupported
    }
    return Startup(user, job_id, forwarded, negotiate)
