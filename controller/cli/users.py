"""``jobmesh user ...``, ``jobmesh grant`` and ``jobmesh revoke``: who may log in, to what.

A password is generated (and shown once) unless ``--password-stdin`` gives it;
the API keeps only its SCRAM verifier, so a lost one is replaced
(``jobmesh user passwd``), never shown again.
"""

from __future__ import annotations

import argparse
import secrets
import sys

from ..mesh import ADMIN_PASSWORD_FILE, MeshInfo
from .client import Client
from .command import OpsError, seg
from .formats import print_data
from .output import table


def new_password(args: argparse.Namespace) -> str:
    """The password ``--password-stdin`` reads (its first line), else a generated one."""
    if not args.password_stdin:
        return secrets.token_urlsafe(18)
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise OpsError("no password on stdin")
    return password


def user_create(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    password = new_password(args)
    body = {"name": args.name, "password": password, **({"stats": True} if args.stats else {})}
    client.call("POST", "/v1/users", body=body)
    print(f"created {'stats ' if args.stats else ''}user {args.name}")
    if not args.password_stdin:
        print(f"password (shown once): {password}")
    return 0


def user_passwd(args: argparse.Namespace, mesh: MeshInfo, client: Client) -> int:
    if args.name == mesh.admin_user:  # `jobmesh up` owns it (and sets it from the file)
        where = mesh.state_dir.absolute() / ADMIN_PASSWORD_FILE
        raise OpsError(f"the admin's password is the file {where}, which `jobmesh up` keeps "
                       "(hint: to get a new one, stop `jobmesh up`, remove that file and "
                       "start `jobmesh up` again: it makes a new password and shows it once)")
    password = new_password(args)
    client.call("PUT", f"/v1/users/{seg(args.name)}/password", body={"password": password})
    print(f"changed the password of user {args.name}")
    if not args.password_stdin:
        print(f"password (shown once): {password}")
    return 0


def user_delete(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    client.call("DELETE", f"/v1/users/{seg(args.name)}")
    print(f"deleted user {args.name}")
    return 0


def user_list(args: argparse.Namespace, _mesh: MeshInfo, client: Client) -> int:
    users = client.call("GET", "/v1/users")["users"]
    if print_data(users, args.output):
        return 0
    rows = [("NAME", "ADMIN", "GRANTS")]
    rows += [(u["name"], "yes" if u["admin"] else "stats" if u.get("stats") else "",
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
