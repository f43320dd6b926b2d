"""One open watch: its filters, and the events it sees."""

from __future__ import annotations

import asyncio

from .selectors import (
    Requirement,
    fields_match,
    labels_match,
)
from .wire import (
    Obj,
)

# --- the server ---------------------------------------------------------------------------


class _Watch:
    """One open watch: its filters and the queue its stream reads."""

    def __init__(self, namespace: str | None, name: str | None, labels: list[Requirement],
                 fields: list[Requirement]) -> None:
        self.namespace, self.name, self.labels, self.fields = namespace, name, labels, fields
        self.queue: asyncio.Queue[Obj | None] = asyncio.Queue()

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        return ((self.namespace is None or meta.get("namespace") == self.namespace)
                and (self.name is None or meta.get("name") == self.name)
                and labels_match(self.labels, meta.get("labels"))
                and fields_match(self.fields, obj))

    def event(self, kind: str, obj: Obj, old: Obj | None) -> Obj | None:
        """The event this watch sees, if any: leaving the selector is a deletion."""
        now_in, was_in = self.matches(obj), self.matches(old)
        if kind == "MODIFIED" and now_in != was_in:
            kind = "ADDED" if now_in else "DELETED"
        elif not now_in and not (kind == "MODIFIED" and was_in):
            return None
        return {"type": kind, "object": obj}
