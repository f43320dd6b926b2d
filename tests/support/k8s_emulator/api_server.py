"""The API server proper: kmock's emulator with every read and write taken over."""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import aiohttp.web
import kmock
import kubernetes_validate

from .checks import (
    semantic_problems,
)
from .selectors import (
    parse_field_selector,
    parse_label_selector,
)
from .watch import _Watch
from .wire import (
    HISTORY_LIMIT,
    K8S_VERSION,
    Key,
    Obj,
    PodLogs,
    Rejection,
    _error,
)
from .writes import ApiWrites


class ApiServer(ApiWrites, kmock.KubernetesEmulator):
    """The emulator proper. It runs on one event loop, and every write is synchronous
    code (no await between check and change), so writes never interleave."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store: dict[Key, Obj] = {}
        self.history: dict[kmock.resource, list[tuple[int, str, Obj, Obj | None]]] = \
            defaultdict(list)
        self.forgotten: dict[kmock.resource, int] = defaultdict(int)
        self.watches: dict[kmock.resource, set[_Watch]] = defaultdict(set)
        self.rv = 1  # never "0" in a list: a watch from "0" means "from any state", not "since"
        self.rejected: list[Rejection] = []
        self.crd_groups: frozenset[str] = frozenset()
        self.graceful_pod_deletion = True
        self.pod_logs: PodLogs | None = None
        self.on_change: Callable[[], None] = lambda: None
        self._cluster_ips = itertools.count(10)

    # --- dispatch ---

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.url.path.rstrip("/") == "/version":
            return aiohttp.web.json_response(
                {"major": "1", "minor": K8S_VERSION.split(".")[1],
                 "gitVersion": f"v{K8S_VERSION}.0+emulator", "gitCommit": "0" * 40,
                 "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                 "goVersion": "go1.25", "compiler": "gc", "platform": "linux/amd64"})
        res = request.resource
        if res is None or not res.plural:
            return await super()._handle(request)  # discovery
        if request.method == "GET":
            if request.subresource == "log":
                return self._serve_log(request)
            if request.subresource not in (None, "status"):
                raise _error(404, "NotFound", f"{res.plural}/{request.subresource} is not "
                             "emulated")
            return await super()._handle(request)  # -> _serve_list/_serve_fetch/_serve_watch
        status, payload = self._write(request)
        return aiohttp.web.json_response(payload, status=status)

    def _write(self, request: Any) -> tuple[int, Obj]:
        method, name, sub = request.method, request.name, request.subresource
        if method == "POST" and name is None:
            return 201, self._create(request)
        if method == "POST" and sub == "binding":
            return 201, self._bind(request)
        if method == "PUT" and name:
            return 200, self._replace(request)
        if method == "PATCH" and name:
            return 200, self._patch(request)
        if method == "DELETE" and name:
            key, cur = self._get(request)
            return 200, self._delete(request, key, cur)
        if method == "DELETE":
            return 200, self._delete_collection(request)
        raise _error(405, "MethodNotAllowed", f"{method} {request.url.path} is not supported")

    # --- helpers ---

    def _kind(self, res: kmock.resource) -> str:
        # Not .get(): kmock's ResourcesArray creates missing entries on access.
        if res in self.resources and self.resources[res].kind:
            return self.resources[res].kind
        return res.plural.capitalize()

    @staticmethod
    def _api_version(res: kmock.resource) -> str:
        return f"{res.group}/{res.version}" if res.group else res.version

    def _has_status(self, res: kmock.resource) -> bool:
        return res in self.resources and "status" in self.resources[res].subresources

    def _get(self, request: Any) -> tuple[Key, Obj]:
        key = (request.resource, request.namespace, request.name)
        if key not in self.store:
            raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found',
                         name=request.name, kind=request.resource.plural)
        return key, self.store[key]

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, res: kmock.resource, kind: str, obj: Obj, old: Obj | None) -> None:
        history = self.history[res]
        history.append((int(obj["metadata"]["resourceVersion"]), kind, obj, old))
        if len(history) > HISTORY_LIMIT:
            self.forgotten[res] = history[HISTORY_LIMIT // 2][0]
            del history[: HISTORY_LIMIT // 2 + 1]
        for watch in list(self.watches[res]):
            if (event := watch.event(kind, obj, old)) is not None:
                watch.queue.put_nowait(event)
        self.on_change()

    def _validate(self, verb: str, obj: Obj) -> None:
        problems: list[str] = []
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{'.'.join(map(str, e.path)) or '<object>'}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            group = str(obj.get("apiVersion", "")).rpartition("/")[0]
            if group not in self.crd_groups:
                problems.append(f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in "
                                f"Kubernetes {K8S_VERSION}: a removed API, or a custom "
                                "resource whose group is not in crd_groups")
        except Exception as e:  # malformed beyond what the validator expects
            problems.append(f"<object>: {e!r}")
        else:
            problems += semantic_problems(obj)
        if problems:
            meta = obj.get("metadata") or {}
            kind, name = obj.get("kind", "?"), meta.get("name")
            self.rejected.append(Rejection(verb, kind, meta.get("namespace"), name,
                                           "; ".join(problems), copy.deepcopy(obj)))
            raise _error(422, "Invalid", f'{kind} "{name}" is invalid: ' + "; ".join(problems),
                         name=name, kind=kind, causes=[{"message": p} for p in problems])

    # --- reads ---

    def _selected(self, request: Any) -> list[Obj]:
        if request.resource not in self.resources and \
                not any(k[0] == request.resource for k in self.store):
            raise _error(404, "NotFound", "the server could not find the requested resource")
        watch = _Watch(request.namespace, request.name,
                       parse_label_selector(request.params.get("labelSelector")),
                       parse_field_selector(request.params.get("fieldSelector")))
        return [obj for key, obj in sorted(self.store.items(),
                                           key=lambda kv: (kv[0][1] or "", kv[0][2]))
                if key[0] == request.resource and watch.matches(obj)]

    async def _serve_list(self, request: Any) -> Obj:
        return {"kind": f"{self._kind(request.resource)}List",
                "apiVersion": self._api_version(request.resource),
                "metadata": {"resourceVersion": str(self.rv)}, "items": self._selected(request)}

    async def _serve_fetch(self, request: Any) -> Obj:
        return self._get(request)[1]

    async def _serve_watch(self, request: Any) -> Any:
        # All before the first yield: bad selectors are a plain 400, and taking the backlog
        # and subscribing happen with no await between them, so no event falls in a gap.
        res, params = request.resource, request.params
        watch = _Watch(request.namespace, request.name,
                       parse_label_selector(params.get("labelSelector")),
                       parse_field_selector(params.get("fieldSelector")))
        since = params.get("resourceVersion") or "0"
        if since == "0":
            backlog = [{"type": "ADDED", "object": o} for o in self._selected(request)]
        elif not since.isdigit() or int(since) < self.forgotten[res]:
            backlog = [{"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "code": 410, "reason": "Expired",
                "message": f"too old resource version: {since} ({self.forgotten[res]})"}}]
        else:
            backlog = [e for rv, kind, obj, old in self.history[res] if rv > int(since)
                       if (e := watch.event(kind, obj, old)) is not None]
        self.watches[res].add(watch)
        try:
            yield b""  # the response starts even when nothing happens for a while
            for event in backlog:
                yield event
            if backlog and backlog[0]["type"] == "ERROR":
                return
            timeout = params.get("timeoutSeconds")
            deadline = asyncio.get_running_loop().time() + float(timeout) if timeout else None
            while True:
                async with asyncio.timeout_at(deadline):
                    event = await watch.queue.get()
                if event is None:
                    return
                yield event
        except TimeoutError:
            return
        finally:
            self.watches[res].discard(watch)

    def _serve_log(self, request: Any) -> aiohttp.web.Response:
        self._get(request)
        container = request.params.get("container")
        text = self.pod_logs(request.namespace, request.name, container) \
            if self.pod_logs else None
        if text is None:
            raise _error(400, "BadRequest", f"no log for pod {request.name} container "
                         f"{container} (is a kubelet serving logs?)")
        if tail := request.params.get("tailLines"):
            text = "".join(text.splitlines(keepends=True)[-int(tail):])
        if limit := request.params.get("limitBytes"):
            text = text.encode()[: int(limit)].decode(errors="ignore")
        return aiohttp.web.Response(text=text, content_type="text/plain")

    def close_watches(self) -> None:
        for watches in self.watches.values():
            for watch in watches:
                watch.queue.put_nowait(None)
