"""What Kubernetes does to strings: ``$(VAR)`` expansion, mount paths, commands (pure)."""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jobmesh.agent.postgres import PostgresError, bin_dir

from .settings import Obj

# --- what Kubernetes does to strings (pure; unit-tested) ----------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` is ``$``; an unknown ``$(VAR)`` stays."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            close = text.find(")", i + 2) if nxt == "(" else -1
            if nxt == "$":
                out.append("$")
                i += 2
            elif close != -1:
                name = text[i + 2:close]
                out.append(env.get(name, f"$({name})"))
                i = close + 1
            else:
                out.append("$" + nxt)
                i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def expand_static(argv: Sequence[str], env_specs: Sequence[Obj]) -> list[str]:
    """How the kubelet's prober expands an exec probe's command
    (ExpandContainerCommandOnlyStatic): only against literal ``value``s; a
    variable set by ``valueFrom`` reads as the empty string."""
    static = {e["name"]: e.get("value", "") for e in env_specs}
    return [expand(a, static) for a in argv]


def mount_rewriter(mounts: Mapping[str, Path]) -> Callable[[str], str]:
    """Rewrite mount paths in a string to host directories, where they start a path."""
    if not mounts:
        return lambda text: text
    table = {m.rstrip("/") or "/": str(host) for m, host in mounts.items()}
    alternatives = "|".join(re.escape(m) for m in sorted(table, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=[^\w./-])|(?<=://))({alternatives})(?=/|$|[^\w.-])")
    return lambda text: pattern.sub(lambda m: table[m[1]], text)


def resolve_command(argv: Sequence[str], search_path: str) -> list[str]:
    """The host program for a container's argv[0] (images are ignored)."""
    exe, rest = argv[0], list(argv[1:])
    name = Path(exe).name
    if "/" not in exe or not Path(exe).exists():
        if name == "jobmesh":
            return [sys.executable, "-m", "jobmesh", *rest]
        if name in ("python", "python3"):
            return [sys.executable, *rest]
        with contextlib.suppress(PostgresError):
            if (bin_dir() / name).exists():
                return [str(bin_dir() / name), *rest]
    if "/" in exe:
        return [exe, *rest]
    found = shutil.which(exe, path=search_path)
    if found is None:
        raise FileNotFoundError(f'exec: "{exe}": executable file not found in $PATH')
    return [found, *rest]
