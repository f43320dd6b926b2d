"""How the operator commands read their arguments: psql's ``--user``, ``-o``, export paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobmesh.cli import build_parser
from jobmesh.controller.cli.command import OpsError
from jobmesh.controller.cli.transfer import export_path

pytestmark = pytest.mark.timeout(60)


def parse(*argv: str):
    return build_parser(list(argv)).parse_args(list(argv))


@pytest.mark.parametrize("argv", [["psql", "--user", "ann", "alpha", "-c", "select 1"],
                                  ["psql", "alpha", "--user", "ann", "-c", "select 1"],
                                  ["psql", "alpha", "--user=ann", "-c", "select 1"]])
def test_psql_user_before_the_job_or_right_after_it(argv: list[str]) -> None:
    args = parse(*argv)
    assert (args.user, args.job, args.psql_args) == ("ann", "alpha", ["-c", "select 1"])


def test_psql_arguments_after_psqls_own_are_psqls() -> None:
    args = parse("psql", "alpha", "-c", "select 1", "--user", "ann")
    assert (args.user, args.psql_args) == (None, ["-c", "select 1", "--user", "ann"])


def test_psql_user_given_twice_or_without_a_name_is_a_usage_error(capsys) -> None:
    for argv in (["psql", "--user", "a", "alpha", "--user", "b"], ["psql", "alpha", "--user"]):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2
    assert "--user" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["job", "list"], ["job", "show", "a"], ["user", "list"],
                                  ["status"]])
def test_json_is_o_json_and_the_default_is_a_table(argv: list[str]) -> None:
    assert parse(*argv).output == "table"
    assert parse(*argv, "--json").output == parse(*argv, "-o", "json").output == "json"


def test_export_path_default_file_and_directories(tmp_path: Path) -> None:
    assert export_path(None, "alpha") == Path("alpha.pgdump")
    assert export_path(str(tmp_path), "alpha") == tmp_path / "alpha.pgdump"
    assert export_path(f"{tmp_path}/", "alpha") == tmp_path / "alpha.pgdump"
    assert export_path(f"{tmp_path}/x.dump", "alpha") == tmp_path / "x.dump"
    assert export_path("/", "alpha") == Path("/alpha.pgdump")


@pytest.mark.parametrize("output, message", [
    ("", "-o names no file"),
    ("{tmp}/nope/", "there is no directory {tmp}/nope"),
    ("{tmp}/nope/x", "there is no directory {tmp}/nope"),
    ("{tmp}/file/", "{tmp}/file is not a directory"),
    ("{tmp}/file/x", "{tmp}/file is not a directory"),
])
def test_export_path_that_cannot_be(tmp_path: Path, output: str, message: str) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OpsError, match=message.format(tmp=tmp_path)):
        export_path(output.format(tmp=tmp_path), "alpha")
