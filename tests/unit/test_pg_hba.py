"""pg_hba.conf of every job's PostgreSQL: nothing by trust over TCP, SCRAM only."""

from __future__ import annotations

import pytest

from jobmesh.agent.init import SERVING_HBA
from jobmesh.controller.backends.local.template import HBA


@pytest.mark.parametrize("lines", [HBA, SERVING_HBA], ids=["local template", "kubernetes"])
def test_tcp_needs_a_scram_password_and_only_the_socket_is_trusted(lines: list[str]) -> None:
    rules = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    assert rules
    for rule in rules:
        if rule[0].startswith("host"):
            assert rule[-1] == "scram-sha-256", rule
        else:
            assert rule[0] == "local", rule  # the private socket: the agent's own tools
    assert any(r[0] == "host" for r in rules)
