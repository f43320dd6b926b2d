"""Create, replace, patch, bind and delete: every write of the API server (a part)."""

from __future__ import annotations

import base64
import copy
import secrets
import uuid
from typing import Any

import jsonpatch
import kmock

from .defaults import merge_patch, pod_spec_defaults, qos_class
from .selectors import (
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from .wire import (
    JSON_PATCH,
    MERGE_PATCHES,
    Key,
    Obj,
    Rejection,
    _error,
    now,
)


class ApiWrites:
    """The writes, for ApiServer: synchronous code, so they never interleave."""

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
