"""A Kubernetes API server for tests: real HTTP on 127.0.0.1, in memory, strict.

kmock's ``KubernetesEmulator`` (pinned: kmock==0.8) gives us request parsing,
discovery for the built-in resources and Kubernetes-style error bodies. The
subclass below takes over every read and write, so that the server behaves
like a real one wherever our controller could tell the difference:

- every object created, replaced or patched is validated against the newest
  schemas kubernetes-validate ships (strict: unknown fields fail), plus the
  API server's own checks that no schema expresses (names, label keys and
  values, container and volume names, mounts of undeclared volumes, quantities,
  restart policies, probes). Failure: 422 ``Invalid``, and the object lands in
  ``rejected`` so a test can assert that nothing was rejected;
- uid, creationTimestamp, generation and one resourceVersion counter; a stale
  ``metadata.resourceVersion`` on PUT or PATCH is 409 ``Conflict``, and so is
  a ``metadata.uid`` in a patch or a DeleteOptions precondition that does not
  match;
- PUT (replace); the status subresource is split (``/status`` writes only
  status, the main resource ignores status); pod specs are immutable except
  images; ``pods/binding``;
- label selectors and field selectors on list, watch and deletecollection;
  watch ``timeoutSeconds``; a watch from a ``resourceVersion`` replays what
  happened since then (410 Gone when that is too old); an object that leaves
  a watch's selector arrives as DELETED;
- graceful pod deletion: deleting a pod bound to a node only sets its
  ``deletionTimestamp``; its kubelet stops it and deletes it with
  ``gracePeriodSeconds=0``. Finalizers hold any object the same way;
- server-side defaults a client may read back: pod status Pending and
  qosClass, restartPolicy, grace period, requests from limits; Service
  clusterIP; Secret ``stringData`` folded into ``data``; ``generateName``;
  ``pods/log`` served by whatever the kubelet registers.

Not emulated: Namespace objects (a namespaced object needs no namespace to
exist), garbage collection by ownerReferences, strategic-merge list semantics
(a strategic merge patch is applied as a JSON merge patch: lists are replaced
whole), server-side apply, exec/attach/port-forward, admission (quotas, limit
ranges, pod security), Endpoints, and Service routing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import kubernetes_validate
from kubernetes import client as k8s_client
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


# --- API-server checks no OpenAPI schema expresses ---------------------------------------

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")
QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?")
SUFFIXES = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "P": 1e15, "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
            "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: str | int | float) -> float:
    """A resource quantity ("500m", "1Gi", "2") as a number; ValueError when malformed."""
    if isinstance(value, int | float):
        return float(value)
    m = QUANTITY.fullmatch(value.strip())
    if not m:
        raise ValueError(f"quantities must match the regular expression {QUANTITY.pattern!r}")
    suffix = m[2] or ""
    if suffix[:1] in ("e", "E"):
        return float(m[1]) * 10 ** int(suffix[1:])
    return float(m[1]) * SUFFIXES[suffix]


def _name_ok(name: str, pattern: re.Pattern[str], limit: int) -> bool:
    return len(name) <= limit and pattern.fullmatch(name) is not None


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (not prefix or _name_ok(prefix, DNS_SUBDOMAIN, 253)) and _name_ok(name, QUALIFIED, 63)


def _labels_problems(path: str, labels: Any) -> list[str]:
    out = []
    for k, v in (labels or {}).items():
        if not _label_key_ok(k):
            out.append(f"{path}: Invalid value: {k!r}: not a valid label key")
        if not isinstance(v, str) or not _name_ok(v, LABEL_VALUE, 63):
            out.append(f"{path}: Invalid value: {v!r}: not a valid label value "
                       "(63 characters at most, alphanumerics, '-', '_' or '.')")
    return out


def _selector_problems(path: str, selector: Any) -> list[str]:
    return _labels_problems(f"{path}.matchLabels", (selector or {}).get("matchLabels"))


def _quantities_problems(path: str, resources: Any) -> list[str]:
    out = []
    values: dict[str, dict[str, float]] = {}
    for kind in ("requests", "limits"):
        for res, q in ((resources or {}).get(kind) or {}).items():
            try:
                values.setdefault(kind, {})[res] = parse_quantity(q)
            except (ValueError, AttributeError):
                out.append(f"{path}.{kind}[{res}]: Invalid value: {q!r}: not a quantity")
    for res, req in values.get("requests", {}).items():
        if res in values.get("limits", {}) and req > values["limits"][res]:
            out.append(f"{path}.requests: Invalid value: {res} must be less than or equal "
                       "to its limit")
    return out


def _pod_spec_problems(path: str, spec: Obj) -> list[str]:
    out = []
    if spec.get("restartPolicy") not in (None, "Always", "OnFailure", "Never"):
        out.append(f"{path}.restartPolicy: Unsupported value: {spec['restartPolicy']!r}")
    volumes = [v.get("name", "") for v in spec.get("volumes") or []]
    for v in volumes:
        if not _name_ok(v, DNS_LABEL, 63):
            out.append(f"{path}.volumes: Invalid value: {v!r}: not a DNS-1123 label")
    if len(set(volumes)) != len(volumes):
        out.append(f"{path}.volumes: Duplicate value")
    seen: set[str] = set()
    port_names: set[str] = set()
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            cp = f"{path}.{group}[{i}]"
            name = c.get("name", "")
            if not _name_ok(name, DNS_LABEL, 63):
                out.append(f"{cp}.name: Invalid value: {name!r}: not a DNS-1123 label")
            if name in seen:
                out.append(f"{cp}.name: Duplicate value: {name!r}")
            seen.add(name)
            sidecar = group == "initContainers" and c.get("restartPolicy") == "Always"
            if c.get("restartPolicy") is not None and not sidecar:
                out.append(f"{cp}.restartPolicy: Forbidden: only 'Always' on init containers")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe)
                if p is None:
                    continue
                if group == "initContainers" and not sidecar:
                    out.append(f"{cp}.{probe}: Forbidden: may not be set for init containers")
                if sum(h in p for h in ("exec", "httpGet", "tcpSocket", "grpc")) != 1:
                    out.append(f"{cp}.{probe}: Required value: exactly one handler")
            for j, port in enumerate(c.get("ports") or []):
                pn = port.get("name")
                if pn is not None and (not _name_ok(pn, PORT_NAME, 15) or "--" in pn
                                       or not re.search("[a-z]", pn)):
                    out.append(f"{cp}.ports[{j}].name: Invalid value: {pn!r}: not an "
                               "IANA_SVC_NAME (15 characters at most)")
                if pn is not None and pn in port_names:
                    out.append(f"{cp}.ports[{j}].name: Duplicate value: {pn!r}")
                if pn:
                    port_names.add(pn)
                if not 0 < port.get("containerPort", 0) < 65536:
                    out.append(f"{cp}.ports[{j}].containerPort: Invalid value")
            for j, e in enumerate(c.get("env") or []):
                if not ENV_NAME.fullmatch(e.get("name", "")):
                    out.append(f"{cp}.env[{j}].name: Invalid value: {e.get('name')!r}")
                if "value" in e and "valueFrom" in e and e["value"]:
                    out.append(f"{cp}.env[{j}]: Invalid value: value and valueFrom both set")
            mounts = [m.get("mountPath", "") for m in c.get("volumeMounts") or []]
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volumes:
                    out.append(f"{cp}.volumeMounts[{j}].name: Not found: {m.get('name')!r}")
                if not m.get("mountPath", "").startswith("/"):
                    out.append(f"{cp}.volumeMounts[{j}].mountPath: must be an absolute path")
            if len(set(mounts)) != len(mounts):
                out.append(f"{cp}.volumeMounts: Invalid value: must be unique")
            out += _quantities_problems(f"{cp}.resources", c.get("resources"))
    return out


def semantic_problems(obj: Obj) -> list[str]:
    """What the API server rejects beyond the OpenAPI schema (a practical subset)."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    out = []
    name = meta.get("name") or ""
    rule = {"Service": (DNS_1035, 63, "a DNS-1035 label"),
            "Namespace": (DNS_LABEL, 63, "a DNS-1123 label")}.get(
                kind or "", (DNS_SUBDOMAIN, 253, "a DNS-1123 subdomain"))
    if not name:
        out.append("metadata.name: Required value")
    elif not _name_ok(name, rule[0], rule[1]):
        out.append(f"metadata.name: Invalid value: {name!r}: must be {rule[2]} (lower case "
                   f"alphanumerics and '-', at most {rule[1]} characters)")
    out += _labels_problems("metadata.labels", meta.get("labels"))
    for k in meta.get("annotations") or {}:
        if not _label_key_ok(k):
            out.append(f"metadata.annotations: Invalid value: {k!r}: not a qualified name")
    if kind == "Pod":
        out += _pod_spec_problems("spec", spec)
    elif kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Job"):
        template = spec.get("template") or {}
        out += _labels_problems("spec.template.metadata.labels",
                                (template.get("metadata") or {}).get("labels"))
        out += _pod_spec_problems("spec.template.spec", template.get("spec") or {})
        out += _selector_problems("spec.selector", spec.get("selector"))
    elif kind == "Service":
        ports = spec.get("ports") or []
        names = [p.get("name") for p in ports]
        if len(ports) > 1 and not all(names):
            out.append("spec.ports: Required value: every port needs a name when there are "
                       "several")
        if len(set(names)) != len(names):
            out.append("spec.ports: Duplicate value: port names")
        out += _labels_problems("spec.selector", spec.get("selector"))
        if spec.get("type") not in (None, "ClusterIP", "NodePort", "LoadBalancer",
                                    "ExternalName"):
            out.append(f"spec.type: Unsupported value: {spec['type']!r}")
    elif kind in ("Secret", "ConfigMap"):
        for section in ("data", "stringData"):
            for k, v in (obj.get(section) or {}).items():
                if not _name_ok(k, DATA_KEY, 253):
                    out.append(f"{section}[{k!r}]: Invalid value: not a valid key")
                if kind == "Secret" and section == "data":
                    try:
                        base64.b64decode(v, validate=True)
                    except (ValueError, TypeError):
                        out.append(f"data[{k!r}]: Invalid value: not base64")
    elif kind == "NetworkPolicy":
        out += _selector_problems("spec.podSelector", spec.get("podSelector"))
        for rule_list, peer_key in (("ingress", "from"), ("egress", "to")):
            for i, r in enumerate(spec.get(rule_list) or []):
                for j, peer in enumerate(r.get(peer_key) or []):
                    for sel in ("podSelector", "namespaceSelector"):
                        out += _selector_problems(f"spec.{rule_list}[{i}].{peer_key}[{j}].{sel}",
                                                  peer.get(sel))
    elif kind == "PodDisruptionBudget":
        out += _selector_problems("spec.selector", spec.get("selector"))
    return out


def qos_class(spec: Obj) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    res = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in res):
        return "BestEffort"
    for r in res:
        limits, requests = r.get("limits") or {}, r.get("requests") or {}
        for name in ("cpu", "memory"):
            if name not in limits or parse_quantity(requests.get(name, limits[name])) != \
                    parse_quantity(limits[name]):
                return "Burstable"
    return "Guaranteed"


def pod_spec_defaults(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        resources = c.get("resources") or {}
        if resources.get("limits"):
            resources["requests"] = {**resources["limits"], **resources.get("requests", {})}
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        for port in c.get("ports") or []:
            port.setdefault("protocol", "TCP")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge, ``null`` deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


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


class ApiServer(kmock.KubernetesEmulator):
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

    # --- writes ---

    def _create(self, request: Any) -> Obj:
        res, ns = request.resource, request.namespace
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(request.data)
        obj.setdefault("apiVersion", self._api_version(res))
        obj.setdefault("kind", self._kind(res))
        meta = obj.setdefault("metadata", {})
        if ns is not None:
            if meta.get("namespace") not in (None, ns):
                raise _error(400, "BadRequest", "the namespace of the provided object does not "
                             "match the namespace sent on the request")
            meta["namespace"] = ns
        if not meta.get("name") and meta.get("generateName"):
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            meta["name"] = meta["generateName"] + "".join(secrets.choice(alphabet)
                                                          for _ in range(5))
        self._validate("create", obj)
        key = (res, ns, meta["name"])
        if key in self.store:
            raise _error(409, "AlreadyExists", f'{res.plural} "{meta["name"]}" already exists',
                         name=meta["name"], kind=res.plural)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(),
                    resourceVersion=self._next_rv())
        if "spec" in obj:
            meta["generation"] = 1
        self._defaults(res, obj)
        self.store[key] = obj
        self._emit(res, "ADDED", obj, None)
        return obj

    def _defaults(self, res: kmock.resource, obj: Obj) -> None:
        """What the real API server fills in on create and clients may read back."""
        if self._has_status(res):
            obj["status"] = {}
        kind = obj.get("kind")
        spec = obj.get("spec") or {}
        if kind == "Pod":
            pod_spec_defaults(spec)
            obj["status"] = {"phase": "Pending", "qosClass": qos_class(spec)}
        elif kind == "Service":
            spec.setdefault("type", "ClusterIP")
            if spec.get("clusterIP") != "None" and spec["type"] != "ExternalName":
                n = next(self._cluster_ips)
                spec.setdefault("clusterIP", f"10.96.{n // 250}.{n % 250 + 1}")
            if "clusterIP" in spec:
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("sessionAffinity", "None")
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
            obj["status"] = {"loadBalancer": {}}
        elif kind == "Secret":
            self._fold_string_data(obj)
            obj.setdefault("type", "Opaque")

    @staticmethod
    def _fold_string_data(obj: Obj) -> None:
        string_data = obj.pop("stringData", None) or {}
        if string_data:
            obj["data"] = {**(obj.get("data") or {}),
                           **{k: base64.b64encode(v.encode()).decode()
                              for k, v in string_data.items()}}

    def _replace(self, request: Any) -> Obj:
        key, cur = self._get(request)
        if not isinstance(request.data, dict):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        new = copy.deepcopy(request.data)
        new.setdefault("apiVersion", cur["apiVersion"])
        new.setdefault("kind", cur["kind"])
        meta = new.setdefault("metadata", {})
        if meta.get("name") not in (None, request.name):
            raise _error(400, "BadRequest", "the name of the object does not match the URL")
        self._preconditions(request, cur, meta.get("resourceVersion"), None)
        return self._update(request, key, cur, new, "replace")

    def _patch(self, request: Any) -> Obj:
        key, cur = self._get(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        body = request.data
        if content_type == JSON_PATCH and isinstance(body, list):
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(cur), body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise _error(422, "Invalid", f"the JSON patch does not apply: {e}") from None
        elif content_type in MERGE_PATCHES and isinstance(body, dict):
            meta = body.get("metadata") or {}
            self._preconditions(request, cur, meta.get("resourceVersion"), meta.get("uid"))
            new = merge_patch(cur, body)
        elif content_type == "application/apply-patch+yaml":
            raise _error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        else:
            raise _error(400, "BadRequest", f"a {content_type or 'typeless'} patch body of "
                         f"type {type(body).__name__} is not supported")
        return self._update(request, key, cur, copy.deepcopy(new), "patch")

    def _preconditions(self, request: Any, cur: Obj, rv: str | None, uid: str | None) -> None:
        meta = cur["metadata"]
        if rv and rv != meta["resourceVersion"]:
            raise _error(409, "Conflict", f'Operation cannot be fulfilled on '
                         f'{request.resource.plural} "{meta["name"]}": the object has been '
                         "modified; please apply your changes to the latest version and try "
                         "again", name=meta["name"], kind=request.resource.plural)
        if uid and uid != meta["uid"]:
            raise _error(409, "Conflict", f"Precondition failed: UID in precondition: {uid}, "
                         f"UID in object meta: {meta['uid']}", name=meta["name"])

    def _update(self, request: Any, key: Key, cur: Obj, new: Obj, verb: str) -> Obj:
        res, sub = request.resource, request.subresource
        if sub == "status":
            new = {**cur, "status": new.get("status") or {}}
        elif sub is not None:
            raise _error(404, "NotFound", f"{res.plural}/{sub} is not emulated")
        elif self._has_status(res):
            new.pop("status", None)
            if "status" in cur:
                new["status"] = cur["status"]
        cmeta = cur["metadata"]
        meta = new["metadata"] = dict(cmeta) if sub == "status" else new.get("metadata") or {}
        for f in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                  "deletionGracePeriodSeconds", "generation", "resourceVersion"):
            if f in cmeta:
                meta[f] = cmeta[f]
            else:
                meta.pop(f, None)
        if res.plural == "pods" and sub is None:
            pod_spec_defaults(new.setdefault("spec", {}))  # as the server defaults a PUT body
            self._check_pod_update(cur, new)
        if res.plural == "services" and sub is None and "clusterIP" in cur.get("spec", {}):
            for f in ("clusterIP", "clusterIPs"):  # kept when an update leaves them out
                new.setdefault("spec", {}).setdefault(f, cur["spec"][f])
        if new.get("kind") == "Secret":
            self._fold_string_data(new)
        if new == cur:
            return cur  # a no-op write changes nothing, not even the resourceVersion
        if "generation" in cmeta and new.get("spec") != cur.get("spec"):
            meta["generation"] = cmeta["generation"] + 1
        self._validate(verb, new)
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and \
                not meta.get("deletionGracePeriodSeconds"):  # the last finalizer went
            return self._remove(key, new)
        self.store[key] = new
        self._emit(res, "MODIFIED", new, cur)
        return new

    def _check_pod_update(self, cur: Obj, new: Obj) -> None:
        def mutable_removed(spec: Obj | None) -> Obj:
            spec = copy.deepcopy(spec or {})
            for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                c.pop("image", None)
            for f in ("activeDeadlineSeconds", "tolerations"):
                spec.pop(f, None)
            return spec

        if mutable_removed(cur.get("spec")) != mutable_removed(new.get("spec")):
            message = ("spec: Forbidden: pod updates may not change fields other than "
                       "`spec.containers[*].image`, `spec.initContainers[*].image`, "
                       "`spec.activeDeadlineSeconds` or `spec.tolerations`")
            meta = cur["metadata"]
            self.rejected.append(Rejection("update", "Pod", meta.get("namespace"),
                                           meta["name"], message, new))
            raise _error(422, "Invalid", f'Pod "{meta["name"]}" is invalid: {message}')

    def _bind(self, request: Any) -> Obj:
        key, cur = self._get(request)
        target = ((request.data or {}).get("target") or {}).get("name")
        if request.resource.plural != "pods" or not target:
            raise _error(400, "BadRequest", "a binding needs target.name")
        if (cur.get("spec") or {}).get("nodeName"):
            raise _error(409, "Conflict", f'pod {request.name} is already assigned to node '
                         f'"{cur["spec"]["nodeName"]}"')
        new = copy.deepcopy(cur)
        new["spec"]["nodeName"] = target
        new.setdefault("status", {})["conditions"] = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.store[key] = new
        self._emit(request.resource, "MODIFIED", new, cur)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _delete(self, request: Any, key: Key, cur: Obj) -> Obj:
        options = request.data if isinstance(request.data, dict) else {}
        pre = options.get("preconditions") or {}
        self._preconditions(request, cur, pre.get("resourceVersion"), pre.get("uid"))
        grace = request.params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        meta = cur["metadata"]
        if request.resource.plural == "pods" and self.graceful_pod_deletion:
            spec, phase = cur.get("spec") or {}, (cur.get("status") or {}).get("phase")
            seconds = int(grace if grace is not None else
                          spec.get("terminationGracePeriodSeconds", 30))
            if spec.get("nodeName") and phase not in ("Succeeded", "Failed") and seconds > 0:
                if meta.get("deletionTimestamp") and meta["deletionGracePeriodSeconds"] <= seconds:
                    return cur
                return self._mark_deleted(request.resource, key, cur, seconds)
        if meta.get("finalizers"):  # held until the last one goes
            if meta.get("deletionTimestamp") and not meta.get("deletionGracePeriodSeconds"):
                return cur
            return self._mark_deleted(request.resource, key, cur, 0)
        gone = self._remove(key, cur)
        if request.resource.plural == "pods":
            return gone
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": meta["name"], "group": request.resource.group,
                            "kind": request.resource.plural, "uid": meta["uid"]}}

    def _mark_deleted(self, res: kmock.resource, key: Key, cur: Obj, grace: int) -> Obj:
        new = copy.deepcopy(cur)
        new["metadata"].update(deletionTimestamp=now(grace), deletionGracePeriodSeconds=grace,
                               resourceVersion=self._next_rv())
        self.store[key] = new
        self._emit(res, "MODIFIED", new, cur)
        return new

    def _remove(self, key: Key, obj: Obj) -> Obj:
        del self.store[key]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(key[0], "DELETED", gone, obj)
        return gone

    def _delete_collection(self, request: Any) -> Obj:
        labels = parse_label_selector(request.params.get("labelSelector"))
        fields = parse_field_selector(request.params.get("fieldSelector"))
        items = []
        for key, obj in sorted(self.store.items(), key=lambda kv: (kv[0][1] or "", kv[0][2])):
            if key[0] == request.resource and request.namespace in (None, key[1]) and \
                    labels_match(labels, obj["metadata"].get("labels")) and \
                    fields_match(fields, obj):
                self._delete(request, key, obj)
                items.append(obj)
        return {"kind": f"{self._kind(request.resource)}List",
                "apiVersion": self._api_version(request.resource),
                "metadata": {"resourceVersion": str(self.rv)}, "items": items}

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


# --- the test-facing wrapper -------------------------------------------------------------


class K8sEmulator:
    """The API server on its own thread and event loop.

    The official client is synchronous and our code calls it through
    ``asyncio.to_thread``; a server on the test's own loop would deadlock the
    first blocking call made from that loop. Use it as a context manager, or
    ``start()`` / ``stop()``; the accessors below are safe from any thread.
    """

    def __init__(self, *, crd_groups: Iterable[str] = (),
                 graceful_pod_deletion: bool = True) -> None:
        self.crd_groups = frozenset(crd_groups)
        self.graceful_pod_deletion = graceful_pod_deletion
        self.url = ""
        self._api: ApiServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._listeners: set[Callable[[], None]] = set()
        self._listeners_lock = threading.Lock()

    def __enter__(self) -> K8sEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> K8sEmulator:
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._failure is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._failure!r}")
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)
        self._thread = None

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._failure = e
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        api = ApiServer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # importlib.resources in kmock
            api.resources.load_bundled()
        api.crd_groups = self.crd_groups
        api.graceful_pod_deletion = self.graceful_pod_deletion
        api.on_change = self._notify
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        # Our own aiohttp runner, not kmock.Server: that one patches aiohttp's resolver
        # process-wide, and waits 60 s for open watches on shutdown.
        server = aiohttp.web.Server(api, access_log=logging.getLogger("tests.k8s_emulator"))
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        async with api:
            await runner.setup()
            await aiohttp.web.SockSite(runner, sock).start()
            self._api = api
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self._ready.set()
            try:
                await self._stopping.wait()
            finally:
                api.close_watches()
                await runner.cleanup()

    def _call(self, fn: Callable[[ApiServer], Any]) -> Any:
        """Run ``fn`` on the server's loop (where the state lives) and return a copy of its
        result; once the server has stopped, on the state it left (``rejected`` after stop)."""
        api = self._api
        if api is None:
            raise RuntimeError("the Kubernetes emulator was never started")
        if self._thread is None or self._loop is None or self._loop.is_closed():
            return copy.deepcopy(fn(api))

        async def call() -> Any:
            return copy.deepcopy(fn(api))

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(15)

    def _notify(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    # --- what tests look at ---

    @staticmethod
    def _matches(res: kmock.resource, kind_plural: str) -> bool:
        """``pods``, ``v1/pods`` or ``networking.k8s.io/v1/networkpolicies``."""
        full = "/".join(p for p in (res.group, res.version, res.plural) if p)
        return kind_plural in (res.plural, full)

    def objects(self, kind_plural: str, namespace: str | None = None) -> list[Obj]:
        """Copies of the stored objects of a kind (every namespace when None), by name."""
        return self._call(lambda api: [
            obj for (res, ns, _), obj in sorted(api.store.items(),
                                                key=lambda kv: (kv[0][1] or "", kv[0][2]))
            if self._matches(res, kind_plural) and namespace in (None, ns)])

    def get(self, kind_plural: str, namespace: str | None, name: str) -> Obj | None:
        return next((o for o in self.objects(kind_plural, namespace)
                     if o["metadata"]["name"] == name), None)

    @property
    def rejected(self) -> list[Rejection]:
        """Every object refused as invalid so far; a test asserts ``== []``."""
        return self._call(lambda api: list(api.rejected))

    def serve_pod_logs(self, pod_logs: PodLogs | None) -> None:
        """Answer ``pods/log`` with ``pod_logs(namespace, pod, container)`` (the kubelet's)."""
        def install(api: ApiServer) -> None:
            api.pod_logs = pod_logs

        self._call(install)

    async def wait_for(self, kind_plural: str, namespace: str | None, name: str,
                       predicate: Callable[[Obj | None], bool], timeout: float = 30) -> Obj | None:
        """Wait (woken by every change, not polling) until ``predicate(object or None)``."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def listener() -> None:
            loop.call_soon_threadsafe(changed.set)

        obj: Obj | None = None
        with self._listening(listener):
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        changed.clear()
                        obj = self.get(kind_plural, namespace, name)
                        if predicate(obj):
                            return obj
                        await changed.wait()
            except TimeoutError:
                raise AssertionError(f"{kind_plural} {namespace}/{name} never matched; last "
                                     f"seen: {json.dumps(obj, indent=1)}") from None

    def wait_for_sync(self, kind_plural: str, namespace: str | None, name: str,
                      predicate: Callable[[Obj | None], bool],
                      timeout: float = 30) -> Obj | None:
        """``wait_for`` for synchronous code (blocks the calling thread)."""
        changed = threading.Event()
        with self._listening(changed.set):
            end = time.monotonic() + timeout
            while True:
                changed.clear()
                obj = self.get(kind_plural, namespace, name)
                if predicate(obj):
                    return obj
                if not changed.wait(max(0.0, end - time.monotonic())):
                    raise AssertionError(f"{kind_plural} {namespace}/{name} never matched; last "
                                         f"seen: {json.dumps(obj, indent=1)}")

    @contextlib.contextmanager
    def _listening(self, listener: Callable[[], None]) -> Any:
        with self._listeners_lock:
            self._listeners.add(listener)
        try:
            yield
        finally:
            with self._listeners_lock:
                self._listeners.discard(listener)

    # --- how clients reach it ---

    def api_client(self) -> k8s_client.ApiClient:
        """A new official-client ApiClient for this server (close it, or use ``with``)."""
        return k8s_client.ApiClient(k8s_client.Configuration(host=self.url))

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig naming this server, for code that loads one (JSON is valid YAML)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }))
        return path
