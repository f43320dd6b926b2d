"""What the emulator's modules share: types, limits, rejections, timestamps, errors."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kmock
import kubernetes_validate
from kubernetes_validate.utils import major_minor

K8S_VERSION = major_minor(kubernetes_validate.latest_version())  # "1.37" with 1.37.0
HISTORY_LIMIT = 5000  # watch-cache events kept per resource; older resourceVersions get 410

Obj = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]
PodLogs = Callable[[str, str, str | None], str | None]

JSON_PATCH = "application/json-patch+json"
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


@dataclass(frozen=True)
class Rejection:
    """An object the server refused as invalid: what a test asserts never happened."""

    verb: str
    kind: str
    namespace: str | None
    name: str | None
    message: str
    object: Obj = field(repr=False)


def now(delta: float = 0) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delta)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message,
                                 details=details or {"message": message})
