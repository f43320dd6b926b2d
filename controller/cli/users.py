"""``jobmesh user ...``, ``jobmesh grant`` and ``jobmesh revoke``: who may log in, to what."""

from __future__ import annotations

import argparse
import secrets
import sys

from ..mesh import MeshInfo
from .client import Client
from .command import OpsError, print_json, seg
from .output import table


def user_create(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise OpsError("no password on stdin")
    else:
        password = secrets.token_urlsafe(18)
    client.call("POST", "/v1/users", body={"name": args.name, "password": password})
    print(f"created user {args.name}")
    if not args.password_stdin:
        print(f"password (shown once): {password}")
    return 0


def user_delete(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("DELETE", f"/v1/users/{seg(args.name)}")
    print(f"deleted user {args.name}")
    return 0


def user_list(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    users = client.call("GET", "/v1/users")["users"]
    if args.json:
        print_json(users)
        return 0
    rows = [("NAME", "ADMIN", "GRANTS")]
    rows += [(u["name"], "yes" if u["admin"] else "",
              ", ".join(f"{g['pattern']}:{g['access']}" for g in u["grants"]) or "-")
             for u in users]
    table(rows)
    return 0


def grant(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("POST", "/v1/grants",
                body={"user": args.user, "pattern": args.pattern, "access": args.access})
    print(f"granted {args.user} {args.access} access to {args.pattern}")
    return 0


def revoke(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("DELETE", "/v1/grants", body={"user": args.user, "pattern": args.pattern})
    print(f"revoked {args.user}'s access to {args.pattern}")
    return 0
