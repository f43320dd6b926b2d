"""The route file, and the router's cancel-key map."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobmesh.router.cancel import MissBudget
from jobmesh.router.cancel_map import BackendKey, CancelMap
from jobmesh.router.credentials import make_verifier
from jobmesh.router.routes import (
    JobRoute,
    RouteFileError,
    job_id_from_database,
    load_routes,
    parse_routes,
)

EXAMPLE = """
[jobs.alpha]              # clients connect with dbname=job_alpha
host = "127.0.0.1"
port = 5433
database = "postgres"     # optional; default job_alpha
user = "postgres"         # the role the router logs in to the backend as
password = "pw"           # optional
max_connections = 100     # optional per-job client limit

[users.alice]
password = "s3cret"       # plain text or a SCRAM-SHA-256$... verifier
jobs = ["alpha"]          # job ids, or "*"
"""

JOB = {"host": "h", "port": 5432, "user": "postgres"}


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "routes.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def rejects(doc: dict, key: str) -> None:
    """parse_routes refuses ``doc`` with a message naming ``key``."""
    with pytest.raises(RouteFileError, match=re.escape(key)):
        parse_routes(doc)


# --- the example file -------------------------------------------------------------


def test_example_file_loads_its_job(tmp_path):
    table = load_routes(write(tmp_path, EXAMPLE))
    assert table.job("alpha") == JobRoute(
        job_id="alpha", host="127.0.0.1", port=5433, database="postgres", user="postgres",
        password="pw", max_connections=100,
    )


def test_example_file_loads_its_user_with_a_verifier_not_the_password(tmp_path):
    alice = load_routes(write(tmp_path, EXAMPLE)).user("alice")
    assert alice.name == "alice"
    assert alice.verifier.matches("s3cret")
    assert not alice.verifier.matches("wrong")
    assert alice.grants == (("alpha", "write"),)


def test_unknown_job_and_user_are_absent():
    table = parse_routes({"jobs": {"alpha": JOB}})
    assert table.job("beta") is None
    assert table.user("alice") is None


def test_empty_document_has_no_jobs_and_no_users():
    table = parse_routes({})
    assert (table.jobs, table.users) == ({}, {})


# --- defaults and grants -------------------------------------------------------------


def test_database_defaults_to_job_prefix_and_id():
    assert parse_routes({"jobs": {"alpha": JOB}}).job("alpha").database == "job_alpha"


def test_optional_job_fields_default_to_none():
    job = parse_routes({"jobs": {"alpha": JOB}}).job("alpha")
    assert (job.password, job.max_connections) == (None, None)


def test_user_without_jobs_may_access_nothing():
    bob = parse_routes({"users": {"bob": {"password": "x"}}}).user("bob")
    assert bob.grants == ()
    assert not bob.may_access("alpha")


def test_user_with_star_may_access_every_job():
    root = parse_routes({"users": {"root": {"password": "x", "jobs": "*"}}}).user("root")
    assert root.may_access("alpha") and root.may_access("zeta-9")


def test_user_with_a_list_may_access_only_the_listed_jobs():
    alice = parse_routes({"users": {"alice": {"password": "x", "jobs": ["a", "b"]}}}).user("alice")
    assert alice.may_access("a") and alice.may_access("b")
    assert not alice.may_access("c")


def test_user_password_given_as_a_verifier_is_used_as_is():
    verifier = make_verifier("s3cret")
    alice = parse_routes({"users": {"alice": {"password": str(verifier)}}}).user("alice")
    assert alice.verifier == verifier


# --- validation names the key at fault ---------------------------------------------


def test_unknown_top_level_section_is_named():
    rejects({"jobs": {}, "groups": {}}, "groups")


def test_jobs_that_is_not_a_table_is_named():
    rejects({"jobs": ["alpha"]}, "[jobs]")


def test_job_that_is_not_a_table_is_named():
    rejects({"jobs": {"alpha": "127.0.0.1"}}, "jobs.alpha")


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_out_of_range_port_is_named(port):
    rejects({"jobs": {"alpha": {**JOB, "port": port}}}, "jobs.alpha.port")


@pytest.mark.parametrize("port", [True, "5432", 5432.0])
def test_port_that_is_not_an_integer_is_named(port):
    with pytest.raises(RouteFileError, match=r"jobs\.alpha\.port: must be an integer"):
        parse_routes({"jobs": {"alpha": {**JOB, "port": port}}})


@pytest.mark.parametrize("key", ["host", "port", "user"])
def test_missing_required_job_key_is_named(key):
    job = {k: v for k, v in JOB.items() if k != key}
    with pytest.raises(RouteFileError, match=re.escape(f"jobs.alpha.{key}: required")):
        parse_routes({"jobs": {"alpha": job}})


def test_unknown_job_key_is_named():
    rejects({"jobs": {"alpha": {**JOB, "hostname": "x"}}}, "jobs.alpha: unknown key(s): hostname")


def test_job_password_that_is_not_a_string_is_named():
    rejects({"jobs": {"alpha": {**JOB, "password": 1234}}}, "jobs.alpha.password")


@pytest.mark.parametrize("limit", [0, True])
def test_bad_max_connections_is_named(limit):
    rejects({"jobs": {"alpha": {**JOB, "max_connections": limit}}}, "jobs.alpha.max_connections")


@pytest.mark.parametrize(("job_id", "why"), [
    ("Alpha", "ids are lowercase"), ("-alpha", "it must start with a letter or digit"),
    ("_a", "it must start with a letter or digit"), ("a.b", "it contains '.'"),
    ("", "the id is empty"), ("a" * 60, "it is 60 characters long")])
def test_bad_job_id_is_named_with_the_one_rule(job_id, why):
    rejects({"jobs": {job_id: JOB}}, f"jobs.{job_id}: bad job id {job_id!r}: {why}; "
            "job ids are 1-59 characters")


def test_longest_job_id_is_accepted():
    assert parse_routes({"jobs": {"a" * 59: JOB}}).job("a" * 59) is not None


def test_user_without_password_is_named():
    rejects({"users": {"alice": {"jobs": ["alpha"]}}}, "users.alice.password: required")


def test_unknown_user_key_is_named():
    rejects({"users": {"alice": {"password": "x", "role": "admin"}}}, "users.alice: unknown key")


def test_malformed_verifier_is_named():
    rejects({"users": {"alice": {"password": "SCRAM-SHA-256$4096:nope"}}}, "users.alice.password")


@pytest.mark.parametrize("jobs", ["alpha", [1], {"alpha": True}])
def test_jobs_that_are_not_a_list_of_ids_or_star_are_named(jobs):
    rejects({"users": {"alice": {"password": "x", "jobs": jobs}}}, "users.alice.jobs")


def test_invalid_job_id_in_a_grant_is_named():
    rejects({"users": {"alice": {"password": "x", "jobs": ["Alpha"]}}}, "users.alice.jobs: 'Alpha'")


def test_plain_password_saslprep_rejects_loads_or_is_named():
    # Postgres hashes such a password's raw bytes; naming the key is acceptable too.
    try:
        parse_routes({"users": {"alice": {"password": "bell\u0007"}}})
    except RouteFileError as exc:
        assert "users.alice.password" in str(exc)


def test_invalid_toml_is_a_route_file_error_naming_the_file(tmp_path):
    path = write(tmp_path, "[jobs.alpha\nport = 1\n")
    with pytest.raises(RouteFileError, match=re.escape(f"{path}: not valid TOML")):
        load_routes(path)


def test_missing_file_is_a_route_file_error_naming_the_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(RouteFileError, match=re.escape(f"{path}: cannot read")):
        load_routes(path)


def test_load_errors_name_the_file_and_the_key(tmp_path):
    path = write(tmp_path, '[jobs.alpha]\nhost = "h"\nport = 0\nuser = "u"\n')
    with pytest.raises(RouteFileError, match=re.escape(f"{path}: jobs.alpha.port")):
        load_routes(path)


def test_file_that_is_not_utf8_is_a_route_file_error(tmp_path):
    path = write(tmp_path, b'[jobs.alpha]\nhost = "caf\xe9"\nport = 5432\nuser = "u"\n')
    with pytest.raises(RouteFileError, match=re.escape(str(path))):
        load_routes(path)


# --- job_id_from_database ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "job_id"),
    [("job_alpha", "alpha"), ("job_a-1_b", "a-1_b"), ("job_job_x", "job_x")],
)
def test_job_database_names_map_to_their_job_id(database, job_id):
    assert job_id_from_database(database) == job_id


@pytest.mark.parametrize("database", ["alpha", "job_", "job_Alpha", "JOB_alpha", "jobmesh",
                                      "job_a.b", "postgres", "job_" + "a" * 64])
def test_other_database_names_map_to_no_job(database):
    assert job_id_from_database(database) is None


# --- CancelMap ------------------------------------------------------------------------------

KEY = BackendKey("10.0.0.5", 5432, pid=4242, secret=b"\x00\xc0\xff\xee")


def test_an_issued_secret_looks_up_the_backend_by_its_real_pid():
    cancels = CancelMap()
    secret = cancels.issue(KEY)
    assert cancels.lookup(KEY.pid, secret) == KEY


def test_an_issued_secret_is_not_the_backends_own_and_has_the_length_asked():
    cancels = CancelMap()
    assert len(cancels.issue(KEY)) == 4
    long = cancels.issue(KEY, 32)
    assert len(long) == 32 and cancels.lookup(KEY.pid, long) == KEY
    assert all(cancels.issue(KEY) != KEY.secret for _ in range(100))


def test_each_issue_for_one_pid_gets_a_distinct_secret():
    cancels = CancelMap()
    secrets = {cancels.issue(KEY) for _ in range(1000)}
    assert len(secrets) == 1000
    assert len(cancels) == 1000


def test_lookup_with_the_wrong_secret_finds_nothing():
    cancels = CancelMap()
    secret = cancels.issue(KEY)
    flipped = bytes([secret[0] ^ 1]) + secret[1:]
    assert cancels.lookup(KEY.pid, flipped) is None
    assert cancels.lookup(KEY.pid, secret + b"\0") is None  # a longer key is another key
    assert cancels.lookup(KEY.pid, secret[:3]) is None


def test_lookup_of_an_unknown_pid_finds_nothing():
    cancels = CancelMap()
    secret = cancels.issue(KEY)
    assert cancels.lookup(KEY.pid + 1, secret) is None


def test_a_released_key_no_longer_looks_up_and_others_of_its_pid_still_do():
    cancels = CancelMap()
    first, second = cancels.issue(KEY), cancels.issue(KEY)
    cancels.release(KEY.pid, first)
    assert cancels.lookup(KEY.pid, first) is None
    assert cancels.lookup(KEY.pid, second) == KEY
    cancels.release(KEY.pid, second)
    assert len(cancels) == 0


def test_releasing_an_unknown_key_is_harmless():
    cancels = CancelMap()
    cancels.release(12345, b"\0" * 4)
    assert len(cancels) == 0


def test_the_same_pid_in_two_pods_stays_apart():
    cancels = CancelMap()
    other = BackendKey("10.0.0.6", 5432, pid=KEY.pid, secret=b"\0\0\0\x08")
    a, b = cancels.issue(KEY), cancels.issue(other)
    assert (cancels.lookup(KEY.pid, a), cancels.lookup(KEY.pid, b)) == (KEY, other)


# --- MissBudget: cancels that match no key, per source address --------------------------------


def test_misses_are_allowed_in_a_burst_then_at_the_rate():
    budget = MissBudget(burst=3, rate=2.0)
    for _ in range(3):
        assert budget.allows("10.1.1.1", 100.0)
        budget.missed("10.1.1.1", 100.0)
    assert not budget.allows("10.1.1.1", 100.0)
    assert budget.allows("10.9.9.9", 100.0)  # another address has its own
    assert not budget.allows("10.1.1.1", 100.4)
    assert budget.allows("10.1.1.1", 100.5)  # half a second: one more
    budget.missed("10.1.1.1", 100.5)
    assert not budget.allows("10.1.1.1", 100.6)
    assert budget.allows("10.1.1.1", 200.0)


def test_the_budget_remembers_a_bounded_number_of_addresses():
    budget = MissBudget(burst=1, rate=0.001, most=10)
    for i in range(100):
        budget.missed(f"10.0.0.{i}", 1.0)
    assert len(budget._buckets) == 10
    assert not budget.allows("10.0.0.99", 1.0)  # the most recent are kept
