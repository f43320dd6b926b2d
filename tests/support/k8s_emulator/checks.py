"""The API server's own checks that no OpenAPI schema expresses (pure)."""

from __future__ import annotations

import base64
import re
from typing import Any

from .wire import (
    Obj,
)

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
