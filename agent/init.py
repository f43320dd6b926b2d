"""``agent init``: a new job's PostgreSQL, archiving WAL from its first transaction.

The cluster is created with data checksums (so a restore can tell a torn
page), WAL archiving into a local spool through ``basic_archive`` (which
fsyncs and renames, so the agent only ever sees whole segments), the job's
database and its two roles. The roles start NOLOGIN: the controller gives
them passwords when it hands out credentials, so a fresh cluster has no
password anyone could guess.

With ``--role-password-env VAR`` (a Kubernetes job pod, where nobody logs in
over the socket to hand out passwords later) the cluster is made ready to
serve at once, as the local backend's template is: both roles LOGIN with the
password from the environment variable (sent as a SCRAM verifier, so the
cleartext never reaches the server or a command line), TCP from anywhere
needs SCRAM (the pod's NetworkPolicy says who may connect at all), the
socket trusts the superuser (for replication too: the agent streams WAL
with pg_receivewal over it), the reader's sessions are read-only by default,
and dblink and postgres_fdw are there (jobs read one another through the
router; neither is a trusted extension, so the owner could not create them).

What the two roles may do is set here once, for both the pods and the local
backend's template (which goes through ``init_pgdata`` and ``prepare_serving``
too). ``job_owner`` owns the database. ``job_reader`` may connect and read:
SELECT on every table and sequence of schema public, now and later (pg_dump
reads each sequence, so without SELECT a reader could not dump a table with a
serial column), and nothing that writes, not even what PostgreSQL lets every
role do by default: no TEMPORARY on the database (a temp table is a write) and
no creating large objects (EXECUTE on ``lo_create``, ``lo_creat`` and
``lo_from_bytea`` is the owner's only; writing into an existing large object
needs its owner's grant, as ``lo_compat_privileges`` is off). Under row-level
security a reader's ``pg_dump --enable-row-security`` dumps the rows the
policies show it (without that option pg_dump refuses such a table).
"""

from __future__ import annotations

import base64
from pathlib import Path

from scramp import ScramMechanism

from jobmesh import jobids
from jobmesh.defaults import ARCHIVE_TIMEOUT

from .errors import AgentError
from .postgres import Instance, PostgresError, conf_quote, free_port, give_to_postgres

OWNER_ROLE = "job_owner"
READER_ROLE = "job_reader"
SUPERUSER = "postgres"  # initdb -U postgres: it creates what the template holds
# What creates a large object, callable by every role in a new database. The owner keeps
# them (pg_restore creates a dump's large objects with lo_create). The server-side
# lo_import(text), lo_import(text, oid) and lo_export(oid, text) are superuser-only
# already (no EXECUTE for PUBLIC since PostgreSQL 11) and must stay so: they read and
# write the server's files as the postgres OS user.
LARGE_OBJECT_CREATORS = ("lo_create(oid)", "lo_creat(integer)", "lo_from_bytea(oid, bytea)")
# pg_hba.conf of a cluster that serves over TCP at once (--role-password-env).
SERVING_HBA = [
    "# jobmesh: the socket trusts the superuser (only the pod's own containers reach it);",
    "# TCP needs the job's password.",
    "local   all   all                 trust",
    "local   replication   all         trust",  # the agent's pg_receivewal
    "host    all   all   0.0.0.0/0     scram-sha-256",
    "host    all   all   ::/0          scram-sha-256",
]


def database_name(job: str) -> str:
    check_job_id(job)
    return f"job_{job}"


def check_job_id(job: str) -> None:
    """The one rule (jobmesh/jobids.py: ``job_<id>`` fits in PostgreSQL's 63 bytes), in
    either case: the agent also makes what is no catalog job, named in upper case so that
    no job id can ever be the same (the local backend's template, ``TEMPLATE-15``)."""
    if not (job.isascii() and jobids.is_job_id(job.lower())):
        raise AgentError(jobids.message(job))


def default_spool(pgdata: Path) -> Path:
    """``<pgdata>.spool`` beside PGDATA: where ``init`` points ``basic_archive``."""
    return pgdata.absolute().with_name(pgdata.absolute().name + ".spool")


def archiving_settings(spool: Path, archive_timeout: int) -> dict[str, str]:
    """What postgresql.conf needs so every finished segment lands in the spool."""
    return {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_library": "'basic_archive'",
        "basic_archive.archive_directory": conf_quote(str(spool)),
        "archive_timeout": str(archive_timeout),
    }


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``, as PostgreSQL stores it."""
    salt, stored_key, server_key, iters = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations)
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${iters}:{b64(salt).decode()}"
            f"${b64(stored_key).decode()}:{b64(server_key).decode()}")


def init_pgdata(pgdata: Path, job: str, *, spool: Path, archive_timeout: int = ARCHIVE_TIMEOUT,
                port: int | None = None, role_password: str | None = None) -> None:
    """Create PGDATA for ``job``, archiving into ``spool``; leaves the server stopped.

    ``port``, when given, is written into postgresql.conf as the server's port.
    ``role_password``, when given, makes the cluster ready to serve over TCP (see
    the module's docstring).
    """
    if role_password is not None and not role_password:
        raise AgentError("the roles' password is empty")
    db = database_name(job)
    if archive_timeout < 0:
        raise AgentError("--archive-timeout must be >= 0 seconds")
    pgdata = pgdata.absolute()
    spool = spool.absolute()
    if pgdata.exists() and (not pgdata.is_dir() or any(pgdata.iterdir())):
        raise AgentError(f"{pgdata} is not empty: refusing to initialise over it")
    if spool == pgdata or spool.is_relative_to(pgdata):
        raise AgentError(f"the WAL spool {spool} must be outside PGDATA {pgdata}")

    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    give_to_postgres(spool)
    inst = Instance(pgdata, port=port or free_port())
    try:
        inst.initdb()
        settings = archiving_settings(spool, archive_timeout)
        if port is not None:
            settings["port"] = str(port)
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# jobmesh agent: archive every WAL segment into the agent's spool\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        if role_password is not None:
            inst.set_hba(SERVING_HBA)
        inst.start()
        try:
            _create_database(inst, db)
            if role_password is not None:
                _make_serving(inst, db, role_password)
        finally:
            inst.stop("fast")
    except PostgresError as exc:
        raise AgentError(f"cannot initialise {pgdata}: {exc}") from exc


def reader_grants(schema: str) -> str:
    """SQL that lets the reader read every table and sequence in ``schema``, now and later.

    Later: whoever creates them, the owner (its sessions, an import) or the superuser
    (the template's own objects). Also run after an import for each schema it brought
    (``grant_reader_everywhere`` in the controller).
    """
    reader, s = _ident(READER_ROLE), _ident(schema)
    statements = [f"GRANT USAGE ON SCHEMA {s} TO {reader}",
                  f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {reader}",
                  f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {reader}"]
    for creator in (OWNER_ROLE, SUPERUSER):
        statements += [f"ALTER DEFAULT PRIVILEGES FOR ROLE {_ident(creator)} IN SCHEMA {s}"
                       f" GRANT SELECT ON {kind} TO {reader}" for kind in ("TABLES", "SEQUENCES")]
    return "; ".join(statements)


def _create_database(inst: Instance, db: str) -> None:
    owner, reader, qdb = _ident(OWNER_ROLE), _ident(READER_ROLE), _ident(db)
    inst.psql(f"CREATE ROLE {owner} NOLOGIN; CREATE ROLE {reader} NOLOGIN")
    inst.psql(f"CREATE DATABASE {qdb} OWNER {owner}")
    # No TEMPORARY for the reader (PUBLIC's default): a temp table is a write.
    inst.psql(f"REVOKE ALL ON DATABASE {qdb} FROM PUBLIC;"
              f" GRANT CONNECT ON DATABASE {qdb} TO {reader}")
    creators = ", ".join(LARGE_OBJECT_CREATORS)
    inst.psql(f"{reader_grants('public')};"
              f" REVOKE EXECUTE ON FUNCTION {creators} FROM PUBLIC;"
              f" GRANT EXECUTE ON FUNCTION {creators} TO {owner}", database=db)


def _make_serving(inst: Instance, db: str, password: str) -> None:
    owner, reader = _ident(OWNER_ROLE), _ident(READER_ROLE)
    verifier = f"'{scram_verifier(password)}'"  # base64, '$' and ':': nothing to escape
    inst.psql(f"ALTER ROLE {owner} LOGIN PASSWORD {verifier};"
              f" ALTER ROLE {reader} LOGIN PASSWORD {verifier}")
    prepare_serving(inst, db)


def prepare_serving(inst: Instance, db: str) -> None:
    """What a serving job's cluster has besides passwords (a pod's at init, the local
    template's once): the reader's sessions read-only unless it asks otherwise (its
    privileges are what really keep it from writing), and dblink and postgres_fdw, which
    are not trusted extensions, so the owner could not create them."""
    owner, reader = _ident(OWNER_ROLE), _ident(READER_ROLE)
    inst.psql(f"ALTER ROLE {reader} SET default_transaction_read_only = on")
    inst.psql("CREATE EXTENSION dblink; CREATE EXTENSION postgres_fdw;"
              f" GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO {owner}", database=db)
