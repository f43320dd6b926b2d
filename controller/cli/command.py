"""What every operator command shares: its signature, its one-line error, how it waits.

A command gets the parsed flags, the running mesh (``mesh.json`` and its
secrets) and an API client, and returns the exit status. What it refuses
before any request is an ``OpsError``; what the API refuses is the client's
``RequestFailed``: both are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from jobmesh import jobids

from ..mesh import MeshInfo
from .client import Client

WAIT_TIMEOUT = 600.0  # how long a command waits for the controller by default, s


class OpsError(Exception):
    """Bad input found before any request; one line for the user."""


Command = Callable[[argparse.Namespace, MeshInfo, Client], int]


def wait_query(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.no_wait else {"wait": 1, "timeout": args.timeout}


def socket_timeout(args: argparse.Namespace) -> float:
    """The socket timeout: longer than the API's own wait, which answers 504 first."""
    return args.timeout + 30


def seg(value: str) -> str:
    """One path segment, whatever the user typed ('a/b' must not reach another endpoint)."""
    return quote(value, safe="")


def job_id(text: str) -> str:
    """``text`` if it is a job id; else OpsError with the one rule (jobmesh/jobids.py), so
    the user reads the CLI's words before any request, not the API's."""
    if not jobids.is_job_id(text):
        raise OpsError(jobids.message(text))
    return text
