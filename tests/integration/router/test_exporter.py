"""What pgbouncer_exporter (prometheus-community, collector.go) reads of the console, read as
it reads it: the simple query protocol, every column it maps, each value parsed as it
parses it, as a stats principal (an exporter's credential).

The exporter itself is a Go program with no Debian package, and Go modules cannot be
fetched here. Debian's prometheus-pgbouncer-exporter (1.7) is an older, different program
that reads SHOW STATS's ``total_requests``, a column PgBouncer itself renamed in 1.8: it
fails against any current PgBouncer, so it is no test of compatibility.
"""

from __future__ import annotations

import math

import psycopg
import pytest

from .test_admin import console
from .test_admin_pause import _router

pytestmark = pytest.mark.timeout(90)

# collector.go's metricMaps: SHOW <namespace>, and the columns it reads as labels / values.
LABELS = {
    "databases": ["name", "host", "port", "database", "force_user", "pool_mode"],
    "stats_totals": ["database"],
    "pools": ["database", "user"],
}
VALUES = {
    # (reserve_pool: PgBouncer 1.24 renamed it reserve_pool_size, as the console names it;
    # the exporter skips that one gauge then, with PgBouncer 1.24 as here)
    "databases": ["pool_size", "max_connections", "current_connections", "paused",
                  "disabled"],
    "stats_totals": ["query_count", "query_time", "bytes_received", "bytes_sent",
                     "wait_time", "xact_count", "xact_time", "client_parse_count",
                     "server_parse_count", "bind_count"],
    "pools": ["cl_active", "cl_active_cancel_req", "cl_waiting", "cl_waiting_cancel_req",
              "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used",
              "sv_tested", "sv_login", "maxwait"],
}
LISTS = ["databases", "users", "pools", "free_clients", "used_clients", "login_clients",
         "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries"]


def _float(value: object) -> float:
    """dbToFloat64: ints and floats, numeric text, NULL as NaN; anything else fails."""
    if value is None:
        return math.nan
    if isinstance(value, int | float):
        return float(value)
    assert isinstance(value, str), value
    return float(value)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_every_column_pgbouncer_exporter_reads_is_there_and_parses(router_factory, pg, mode):
    r = _router(router_factory, pg, mode)
    with console(r, user="watcher", password="w4tch-pw") as conn, \
            psycopg.connect(r.dsn(), autocommit=True) as client:
        client.execute("select 1")
        conn.execute("SHOW STATS").fetchall()  # its ping
        cur = conn.execute("SHOW VERSION;")
        assert [c.name for c in cur.description] == ["version"]
        assert cur.fetchone()[0]
        cur = conn.execute("SHOW LISTS;")
        assert len(cur.description) == 2
        lists = {name: _float(items) for name, items in cur.fetchall()}
        assert set(LISTS) <= set(lists)
        cur = conn.execute("SHOW CONFIG;")
        assert len(cur.description) in (3, 4)
        config = {row[0]: row[1] for row in cur.fetchall()}
        for key in ("max_client_conn", "max_user_connections"):
            assert not math.isnan(_float(config[key]))
        for namespace in LABELS:
            cur = conn.execute(f"SHOW {namespace.upper()};")
            names = [c.name for c in cur.description]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            assert set(LABELS[namespace]) | set(VALUES[namespace]) <= set(names), namespace
            assert rows, f"SHOW {namespace} has no row for job alpha"
            for row in rows:
                for label in LABELS[namespace]:
                    assert row[label] is None or isinstance(row[label], str | int)
                for column in VALUES[namespace]:
                    _float(row[column])
        cur = conn.execute("SHOW STATS_TOTALS")
        names = [c.name for c in cur.description]
        [totals] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()
                    if row[0] == "job_alpha"]
        assert totals["bytes_received"] > 0 and totals["bytes_sent"] > 0
