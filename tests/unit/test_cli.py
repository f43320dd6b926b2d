"""The ``jobmesh`` entry point's own conventions: help, version, where --state-dir goes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def jobmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobmesh", *args], capture_output=True,
                          text=True, timeout=50, env={**os.environ, **(env or {})})


def test_bare_jobmesh_prints_the_help() -> None:
    r = jobmesh()
    assert r.returncode == 0 and "usage: jobmesh" in r.stdout and "COMMAND" in r.stdout


def test_version() -> None:
    r = jobmesh("--version")
    assert r.returncode == 0 and r.stdout.startswith("jobmesh ")
    assert r.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("args", [["--state-dir", "{d}", "status"],
                                  ["status", "--state-dir", "{d}"],
                                  ["--state-dir={d}", "job", "list"],
                                  ["job", "list", "--state-dir", "{d}"]])
def test_state_dir_works_before_or_after_the_command(tmp_path, args) -> None:
    d = str(tmp_path / "nowhere")
    r = jobmesh(*(a.format(d=d) for a in args), env={"JOBMESH_STATE_DIR": "/elsewhere"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"jobmesh {' '.join(a for a in args if a in ('status', 'job', 'list'))}: "
        f"no running mesh under {d}: start it with `jobmesh up`"]


def test_the_flag_after_the_command_beats_the_one_before(tmp_path) -> None:
    r = jobmesh("--state-dir", str(tmp_path / "a"), "status", "--state-dir", str(tmp_path / "b"))
    assert r.returncode == 1 and str(tmp_path / "b") in r.stderr


def flags_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += flags_without_help(sub, f"{path} {name}")
        elif action.option_strings and action.help is None:
            missing.append(f"{path} {action.option_strings[0]}")
    return missing


def test_every_flag_of_every_command_has_help() -> None:
    from jobmesh.cli import COMMANDS, build_parser

    missing = []
    for name in COMMANDS:  # (a command's flags are registered only when it is named)
        missing += [m for m in flags_without_help(build_parser([name]), "jobmesh")
                    if m.split()[1] == name]
    assert missing == []
