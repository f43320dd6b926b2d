"""Finding the running mesh: the files `jobmesh up` leaves in its state directory.

`jobmesh up` writes ``mesh.json`` (where the API and the router listen, and the
admin's name) once everything is up, beside two secrets it creates once and
keeps across restarts: ``api-token`` (the API's bearer token) and
``admin-password`` (the router's admin user). The operator commands read them,
so ``jobmesh job list`` needs no flags on the machine that runs the mesh.

The state directory comes from ``--state-dir``, else ``JOBMESH_STATE_DIR``,
else ``./.jobmesh`` (``jobmesh.defaults.state_dir``).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

MESH_FILE = "mesh.json"
TOKEN_FILE = "api-token"
ADMIN_PASSWORD_FILE = "admin-password"
AGENT_KEY_FILE = "agent-key"  # the jobs' agent tokens derive from it (agent/apitoken.py)


class MeshError(Exception):
    """The mesh cannot be found or its files are unreadable; one line for the user."""


@dataclass(frozen=True)
class MeshInfo:
    state_dir: Path
    api: str  # http://127.0.0.1:PORT
    router_host: str
    router_port: int
    admin_user: str
    token: str

    def admin_password(self) -> str:
        return _read_secret(self.state_dir / ADMIN_PASSWORD_FILE, self.state_dir)


def write_mesh(state_dir: Path, api_url: str, router_host: str, router_port: int,
               admin_user: str) -> Path:
    """Announce a running mesh (atomically: readers see the old file or the new one)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    body = {"api": api_url, "router": {"host": router_host, "port": router_port},
            "admin_user": admin_user}
    path = state_dir / MESH_FILE
    tmp = path.with_name(f".{MESH_FILE}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def remove_mesh(state_dir: Path) -> None:
    """`jobmesh up` on its way out: nothing answers at the announced addresses any more."""
    (state_dir / MESH_FILE).unlink(missing_ok=True)


def announced_router(state_dir: Path) -> tuple[str, int] | None:
    """Where mesh.json says the router listens (None: no readable mesh.json)."""
    try:
        raw = json.loads((state_dir / MESH_FILE).read_text())
        return str(raw["router"]["host"]), int(raw["router"]["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_mesh(state_dir: Path) -> MeshInfo:
    """The running mesh under ``state_dir``; MeshError when there is none."""
    path = state_dir / MESH_FILE
    try:
        raw = json.loads(path.read_text())
        info = MeshInfo(state_dir=state_dir, api=str(raw["api"]).rstrip("/"),
                        router_host=str(raw["router"]["host"]),
                        router_port=int(raw["router"]["port"]),
                        admin_user=str(raw["admin_user"]),
                        token=_read_secret(state_dir / TOKEN_FILE, state_dir))
    except FileNotFoundError:
        raise _not_running(state_dir) from None
    except PermissionError as exc:
        raise MeshError(f"cannot read {exc.filename}: permission denied") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise MeshError(f"{path} is damaged ({type(exc).__name__}: {exc}): restart the mesh "
                        "with `jobmesh up`") from None
    return info


def ensure_secret(path: Path) -> str:
    """The secret in ``path``, created once (0600, random) if it does not exist yet.

    The file appears with its content or not at all (written aside, then hard-linked
    into place), so two processes starting at once agree on one secret.
    """
    if path.exists():
        return _read_secret(path, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # someone else made it first: theirs counts
    finally:
        tmp.unlink()
    return _read_secret(path, path.parent)


def _read_secret(path: Path, state_dir: Path) -> str:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise _not_running(state_dir) from None
    except PermissionError:
        raise MeshError(f"cannot read {path}: permission denied (run as the user who "
                        "started the mesh)") from None
    if not text:
        raise MeshError(f"{path} is empty")
    return text


def _not_running(state_dir: Path) -> MeshError:
    return MeshError(f"no running mesh under {state_dir}: start it with `jobmesh up`")
