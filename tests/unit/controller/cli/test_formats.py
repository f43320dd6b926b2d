"""``-o yaml`` without a YAML library: what it writes, YAML reads back as the same value."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from jobmesh.controller.cli.formats import yaml_lines

pytestmark = pytest.mark.timeout(60)

# JSON values as the API answers them: keys are strings; floats are finite.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                 allow_infinity=False) | st.text()
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


def read_back(value: Any) -> Any:
    return yaml.safe_load("\n".join(yaml_lines(value)))


@given(json_values)
def test_yaml_reads_back_as_the_json_value(value: Any) -> None:
    assert read_back(value) == json.loads(json.dumps(value))


@pytest.mark.parametrize("text", ["yes", "No", "on", "null", "~", "1Gi", "2", "0x1f", "1e3",
                                  "2026-12-02", "2026-12-02T01:19:55+00:00", "a: b", "#x",
                                  "- x", "", " lead", "trail ", "tab\there", "new\nline",
                                  "\x7f", "\u2028", "\U0001f600", "'q'", '"q"', "{}", "[]",
                                  "*alias", "&anchor", "!tag", "%dir", "@at", "`tick`"])
def test_strings_yaml_would_read_as_something_else_stay_strings(text: str) -> None:
    assert read_back({"k": text, text: [text]}) == {"k": text, text: [text]}


def test_plain_words_are_written_plainly() -> None:
    assert yaml_lines({"state": "running", "warnings": [], "spec": {}, "users": 3,
                       "y": True}) == [
        "state: running", "warnings: []", "spec: {}", "users: 3", '"y": true']


@pytest.mark.parametrize("number", [1e-06, 1e16, -2.5e-300, 0.1, 3.0, 12])
def test_numbers_read_back_as_numbers(number: float) -> None:
    assert read_back([number]) == [number]


def test_lists_of_mappings_are_kubectl_style() -> None:
    assert yaml_lines({"jobs": [{"id": "a", "port": None}, {"id": "b", "port": 1}]}) == [
        "jobs:", "  - id: a", "    port: null", "  - id: b", "    port: 1"]
