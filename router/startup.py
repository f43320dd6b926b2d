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
from .routes import ADMIN_ALIASES, JOB_DATABASE_PREFIX, job_id_from_database

# The cancel secret's length: 4 bytes is all protocol 3.0 has; a 3.2 client (libpq 18
# with max_protocol_version=3.2) takes a longer one, 32 bytes as PostgreSQL 18 sends.
KEY_3_0 = 4
KEY_3_2 = 32

# Startup parameters that are the router's business, not the backend's.
_NOT_FORWARDED = {"user", "database", "replication"}


@dataclass(frozen=True, slots=True)
class Startup:
    user: str
    job_id: str
    forwarded: dict[str, str]  # for the backend's StartupMessage
    negotiate: bytes | None  # a NegotiateProtocolVersion to send first, if any
    key_length: int = KEY_3_0  # bytes of the cancel secret its BackendKeyData carries
    console: bool = False  # dbname=jobmesh (or pgbouncer): the admin console


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
    if database in ADMIN_ALIASES:
        return Startup(user, "", {}, None, console=True)  # (admin.py: protocol 3.0, no options)
    job_id = job_id_from_database(database)
    if job_id is None:
        if database.startswith(JOB_DATABASE_PREFIX):
            raise errors.bad_job_id(database, database[len(JOB_DATABASE_PREFIX) :])
        raise errors.invalid_database(database)
    unsupported = [k for k in params if k.startswith("_pq_.")]
    # 3.2 is spoken to the client only (its one change is the longer cancel key); the
    # backend is asked for 3.0. 3.1 was never used: such a client is offered 3.0.
    version = pg.PROTOCOL_3_2 if startup.minor >= 2 else pg.PROTOCOL_3_0
    negotiate = None
    if startup.minor not in (0, 2) or unsupported:
        negotiate = pg.negotiate_protocol_version(version, unsupported)
    forwarded = {
        k: v for k, v in params.items() if k not in _NOT_FORWARDED and k not in unsupported
    }
    key_length = KEY_3_2 if version == pg.PROTOCOL_3_2 else KEY_3_0
    return Startup(user, job_id, forwarded, negotiate, key_length)
