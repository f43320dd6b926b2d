# syntax=docker/dockerfile:1
#
# One image for every jobmesh container: the router, the controller, and each
# job pod's init step (`jobmesh agent restore`), its PostgreSQL and its agent
# sidecar. The job's Postgres and the agent must see the same server binaries
# (the agent runs initdb, pg_ctl, pg_basebackup, pg_dump), so they ship
# together.
#
#   docker build -t registry.example.com/jobmesh:0.1.0 .
#   docker run --rm registry.example.com/jobmesh:0.1.0 router --help
#
# PostgreSQL 15 and Python 3.11 both come from Debian 12 (bookworm), so the
# venv built in the first stage runs unchanged on the second one's
# /usr/bin/python3.11.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# --- build: the jobmesh venv --------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS build

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/jobmesh \
 && /opt/jobmesh/bin/pip install --no-cache-dir --upgrade pip

# Only what `pip install .` reads; .dockerignore keeps the rest out of the context.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobmesh ./jobmesh
COPY router ./router
COPY agent ./agent
COPY controller ./controller
# A regular (not editable) install: the runtime stage copies /opt/jobmesh alone.
RUN /opt/jobmesh/bin/pip install --no-cache-dir '.[s3,kubernetes]' \
 && /opt/jobmesh/bin/jobmesh --help >/dev/null

# --- runtime -----------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE}

LABEL org.opencontainers.image.title="jobmesh" \
      org.opencontainers.image.description="A dedicated PostgreSQL per job behind one Postgres-wire endpoint: router, controller, agent and PostgreSQL 15"

# The postgres user and group get uid/gid 999 BEFORE the packages are installed
# (as in the official postgres images); postgresql-common would otherwise pick
# the next free system uid (101 on a plain bookworm). The manifests'
# securityContext says runAsUser: 999 and fsGroup: 999.
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql \
            --shell /bin/bash postgres \
 && mkdir -p /var/lib/postgresql \
 && chown postgres:postgres /var/lib/postgresql

# postgresql-15 includes the contrib modules (it Provides postgresql-contrib-15),
# basic_archive among them, which the agent's WAL archiving uses. No default
# cluster: every job's PGDATA is made by `jobmesh agent` (initdb or restore).
# ca-certificates: TLS to S3. python3: the interpreter the venv links to.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-common \
 && sed -ri 's/^#?\s*create_main_cluster\s*=.*$/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf \
 && apt-get install -y --no-install-recommends \
        postgresql-15 \
        python3 \
        ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/run/postgresql /var/lib/jobmesh \
 && chown postgres:postgres /var/run/postgresql /var/lib/jobmesh \
 && chmod 2775 /var/run/postgresql

COPY --from=build /opt/jobmesh /opt/jobmesh

# The Postgres binaries and the venv on PATH: `postgres`, `pg_ctl`, `psql` and
# `jobmesh` resolve without full paths. C.UTF-8 needs no locales package and
# is what initdb picks up.
ENV PATH=/opt/jobmesh/bin:/usr/lib/postgresql/15/bin:$PATH \
    JOBMESH_PG_BINDIR=/usr/lib/postgresql/15/bin \
    JOBMESH_STATE_DIR=/var/lib/jobmesh \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Numeric, so Kubernetes can check runAsNonRoot without a passwd lookup.
USER 999:999
WORKDIR /var/lib/jobmesh

# 6432 router, 6480 controller API and metrics, 9432 router metrics,
# 5432 a job's PostgreSQL, 8008 a job's agent API and metrics.
EXPOSE 6432 6480 9432 5432 8008

# Pods give the subcommand as args (`router ...`, `controller ...`,
# `agent serve ...`); the job pod's PostgreSQL container sets
# `command: [postgres, ...]` instead.
ENTRYPOINT ["jobmesh"]
CMD ["--help"]
