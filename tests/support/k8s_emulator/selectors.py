"""Label and field selectors, as the API server parses and applies them (pure)."""

from __future__ import annotations

import re
from typing import Any

from .wire import (
    Obj,
    _error,
)

# --- selectors -------------------------------------------------------------------------

Requirement = tuple[str, str, Any]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``."""
    reqs: list[Requirement] = []
    for part in re.split(r",(?![^(]*\))", text or ""):
        part = part.strip()
        if not part:
            continue
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part):
            reqs.append((m[1], m[2], frozenset(v.strip() for v in m[3].split(","))))
        elif m := re.fullmatch(r"([^!=\s]+)\s*(==|=|!=)\s*([^!=\s]*)", part):
            reqs.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
        elif m := re.fullmatch(r"!\s*([^!=\s(),]+)", part):
            reqs.append((m[1], "!", None))
        elif re.fullmatch(r"[^!=\s(),]+", part):
            reqs.append((part, "exists", None))
        else:
            raise _error(400, "BadRequest", f"unable to parse requirement: {part!r}")
    return reqs


def labels_match(reqs: list[Requirement], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    for key, op, value in reqs:
        have = labels.get(key)
        if op in ("exists", "!"):
            ok = (key in labels) == (op == "exists")
        elif op in ("in", "notin"):
            ok = (have in value) == (op == "in")
        else:
            ok = (have == value) == (op == "=")
        if not ok:
            return False
    return True


FIELD_PATHS = {"metadata.name", "metadata.namespace", "status.phase", "spec.nodeName",
               "status.podIP", "spec.restartPolicy", "spec.serviceAccountName"}


def parse_field_selector(text: str | None) -> list[Requirement]:
    reqs = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise _error(400, "BadRequest", f"invalid field selector: {part!r}")
        if m[1] not in FIELD_PATHS:
            raise _error(400, "BadRequest", f'field label not supported: {m[1]}')
        reqs.append((m[1], "!=" if m[2] == "!=" else "=", m[3]))
    return reqs


def fields_match(reqs: list[Requirement], obj: Obj) -> bool:
    for path, op, value in reqs:
        have: Any = obj
        for part in path.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if ((have or "") == value) != (op == "="):
            return False
    return True
