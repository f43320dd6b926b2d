"""What transaction mode refuses (it needs a session), and what it lets through, read
from the SQL text with comments, literals and dollar quotes set aside."""

from __future__ import annotations

import pytest

from jobmesh.router.txsql import FORGET_ALL, Unsupported, check_sql, statement_name


@pytest.mark.parametrize("sql", [
    "SET work_mem = '8MB'",
    "set session search_path = x",
    "select 1; set x.y = 1",
    "  /* hi */ LISTEN jobs",
    "select pg_advisory_lock(1)",
    "select pg_try_advisory_lock_shared (1, 2)",
    "do $$ begin perform pg_advisory_lock(1); end $$",  # (a body's text is read for it)
    "declare c cursor with hold for select 1",
    "create temporary table t (n int)",
    "CREATE GLOBAL TEMP TABLE t (n int)",
    "prepare p as select 1",
])
def test_session_features_are_refused(sql):
    with pytest.raises(Unsupported):
        check_sql(sql)


@pytest.mark.parametrize("sql", [
    "select 1",
    "SET LOCAL work_mem = '8MB'",
    "set transaction isolation level serializable",
    "set constraints all deferred",
    "select pg_advisory_xact_lock(1)",
    "create temp table t (n int) on commit drop",
    "select 'set work_mem = 1; listen x'",
    'select 1 as "set"',
    "-- set x = 1\nselect 1",
    "do $$ begin raise notice 'set x = 1'; end $$",
    "select $tag$ prepare p as select 1 $tag$",
    "update settings set v = 1",
])
def test_what_lives_within_a_transaction_passes(sql):
    assert check_sql(sql) is None


@pytest.mark.parametrize("sql", ["discard all", "DEALLOCATE ALL", "deallocate prepare all",
                                 "select 1; discard all"])
def test_what_deallocates_every_statement_is_followed(sql):
    assert check_sql(sql) == FORGET_ALL


@pytest.mark.parametrize(("sql", "name"), [
    ("deallocate s1", b"s1"), ("DEALLOCATE PREPARE _pg3_0;", b"_pg3_0"),
    ('deallocate "MyStmt"', b"MyStmt"), ("deallocate MyStmt", b"mystmt")])
def test_a_lone_deallocate_names_its_statement(sql, name):
    assert check_sql(sql) == name


@pytest.mark.parametrize("sql", ["discard plans", "select 1; deallocate s1", "discard temp"])
def test_other_discards_and_deallocates_in_a_list_pass(sql):
    assert check_sql(sql) is None


def test_statement_names_depend_on_text_and_parameter_types_only():
    a = statement_name(b"select $1\0\0\1\0\0\0\x17")
    assert a == statement_name(b"select $1\0\0\1\0\0\0\x17")
    assert a != statement_name(b"select $1\0\0\1\0\0\0\x19")
    assert a.startswith(b"jm_") and len(a) < 63  # within NAMEDATALEN
