"""A pod's configuration: volumes, users, env and commands (a PodRun part)."""

from __future__ import annotations

import base64
import json
import math
import os
import pwd
import re
import sys
from pathlib import Path

from kubernetes.client.rest import ApiException

from jobmesh.agent.postgres import os_user
from tests.support.k8s_emulator import parse_quantity

from .container import ConfigError, Container
from .expansion import expand, mount_rewriter, resolve_command
from .settings import Obj


class PodConfig:
    """Configuring containers, for PodRun."""

    # --- configuration: volumes, users, env, command ---

    def _configure(self) -> None:
        sources: dict[tuple[str, str], dict[str, bytes] | None] = {}
        owner = self._pod_user()
        for v in self.spec.get("volumes") or []:
            self.volumes[v["name"]] = self._volume(v, owner, sources)
        for c in self.containers:
            self._configure_container(c, sources)

    def _pod_user(self) -> pwd.struct_passwd | None:
        """Who owns the pod's volumes: the Postgres OS user when anything runs as non-root."""
        contexts = [self.spec.get("securityContext") or {}] + [
            c.spec.get("securityContext") or {} for c in self.containers]
        if os.geteuid() == 0 and any(ctx.get("runAsUser") or ctx.get("fsGroup")
                                     for ctx in contexts):
            return pwd.getpwnam(os_user() or "postgres")
        return None

    def _volume(self, v: Obj, owner: pwd.struct_passwd | None,
                sources: dict[tuple[str, str], dict[str, bytes] | None]) -> Path:
        if "hostPath" in v:
            return Path(v["hostPath"]["path"])
        path = self.dir / v["name"]
        path.mkdir(exist_ok=True)
        if "emptyDir" in v:
            path.chmod(0o777)
            if limit := (v["emptyDir"] or {}).get("sizeLimit"):
                self.size_limits[v["name"]] = limit
        else:
            kind, src = ("Secret", v["secret"]) if "secret" in v else ("ConfigMap", v["configMap"])
            data = self._source(kind, src.get("secretName") or src.get("name", ""),
                                bool(src.get("optional")), sources) or {}
            items = [(i["key"], i["path"], i.get("mode")) for i in src.get("items") or []] or \
                [(k, k, None) for k in data]
            for key, rel, mode in items:
                if key not in data:
                    if src.get("optional"):
                        continue
                    raise ConfigError(f"couldn't find key {key} in {kind} {src}")
                target = path / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[key])
                target.chmod(mode or src.get("defaultMode", 0o644))
            path.chmod(0o755)
        if owner is not None:
            for p in [path, *path.rglob("*")]:
                os.chown(p, owner.pw_uid, owner.pw_gid)
        return path

    def _source(self, kind: str, name: str, optional: bool,
                cache: dict[tuple[str, str], dict[str, bytes] | None]) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's data, decoded; None when optional and absent."""
        if (kind, name) not in cache:
            read = self.api.read_namespaced_secret if kind == "Secret" else \
                self.api.read_namespaced_config_map
            try:
                obj = json.loads(read(name, self.namespace, _preload_content=False).data)
            except ApiException as e:
                if e.status != 404:
                    raise
                if not optional:
                    raise ConfigError(f'{kind.lower()} "{name}" not found') from None
                cache[(kind, name)] = None
                return None
            data = {k: base64.b64decode(v) if kind == "Secret" else v.encode()
                    for k, v in (obj.get("data") or {}).items()}
            data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            cache[(kind, name)] = data
        return cache[(kind, name)]

    def _configure_container(self, c: Container,
                             sources: dict[tuple[str, str], dict[str, bytes] | None]) -> None:
        mounts = {}
        for m in c.spec.get("volumeMounts") or []:
            host = self.volumes[m["name"]] / m.get("subPath", "")
            host.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = host
        c.rewrite = mount_rewriter(mounts)
        ctx = {**(self.spec.get("securityContext") or {}), **(c.spec.get("securityContext") or {})}
        c.user = pwd.getpwnam(os_user() or "postgres") \
            if os.geteuid() == 0 and ctx.get("runAsUser") else None
        home = c.user.pw_dir if c.user else pwd.getpwuid(os.geteuid()).pw_dir
        env = {"PATH": self.kubelet.search_path, "HOSTNAME": self.name, "HOME": home,
               **self.kubelet.image_env}
        for src in c.spec.get("envFrom") or []:
            kind, ref = ("Secret", src["secretRef"]) if "secretRef" in src else \
                ("ConfigMap", src["configMapRef"])
            data = self._source(kind, ref["name"], bool(ref.get("optional")), sources) or {}
            env.update({src.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for e in c.spec.get("env") or []:
            if "valueFrom" in e:
                value = self._value_from(c, e["valueFrom"], sources)
                if value is not None:
                    env[e["name"]] = value
            else:
                env[e["name"]] = expand(c.rewrite(e.get("value", "")), env)
        command = c.spec.get("command") or self.kubelet.entrypoint(c.spec.get("image", ""))
        argv = [expand(c.rewrite(a), env) for a in [*command, *(c.spec.get("args") or [])]]
        c.env, c.cwd = env, c.rewrite(c.spec.get("workingDir") or "/")
        c.start_error = None
        if not command:
            c.start_error = (f"no command, and the test kubelet knows no entrypoint for image "
                             f"{c.spec.get('image')!r} (images are ignored)")
            return
        try:
            c.argv = resolve_command(argv, env["PATH"])
        except FileNotFoundError as e:
            c.start_error = str(e)
            return
        if c.user is not None and c.argv[0] == sys.executable and \
                not _can_execute(c.user, Path(sys.executable)):
            self.kubelet.warnings.append(
                f"pod {self.name} container {c.name}: {c.user.pw_name} cannot execute "
                f"{sys.executable}; running it as {pwd.getpwuid(os.geteuid()).pw_name}")
            c.user = None
            c.env["HOME"] = pwd.getpwuid(os.geteuid()).pw_dir

    def _value_from(self, c: Container, value_from: Obj,
                    sources: dict[tuple[str, str], dict[str, bytes] | None]) -> str | None:
        if "fieldRef" in value_from:
            path = value_from["fieldRef"]["fieldPath"]
            meta = self.pod["metadata"]
            fields = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                      "metadata.uid": self.uid, "spec.nodeName": self.kubelet.node_name,
                      "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                      "status.podIP": self.ip, "status.podIPs": self.ip,
                      "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1"}
            if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                return (meta.get(m[1]) or {}).get(m[2], "")
            if path not in fields:
                raise ConfigError(f"fieldRef {path} is not supported by the test kubelet")
            return fields[path]
        if "resourceFieldRef" in value_from:
            ref = value_from["resourceFieldRef"]
            target = self.container(ref.get("containerName") or c.name)
            kind, _, resource = ref["resource"].partition(".")
            value = ((target.spec.get("resources") or {}).get(kind) or {}).get(resource)
            if value is None:  # no limit: the node's capacity; no request: zero
                value = (os.cpu_count() or 1 if resource == "cpu" else
                         os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) \
                    if kind == "limits" else 0
            return str(math.ceil(parse_quantity(value) / parse_quantity(ref.get("divisor", "1"))))
        kind, ref = ("Secret", value_from["secretKeyRef"]) if "secretKeyRef" in value_from else \
            ("ConfigMap", value_from["configMapKeyRef"])
        data = self._source(kind, ref["name"], bool(ref.get("optional")), sources)
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} "
                              f"{self.namespace}/{ref['name']}")
        return data[ref["key"]].decode()


def _can_execute(user: pwd.struct_passwd, program: Path) -> bool:
    """Can ``user`` execute ``program`` (its real file, and every directory on the way)?"""
    real = program.resolve()
    for path in [*reversed(real.parents), real]:
        try:
            st = path.stat()
        except OSError:
            return False
        bit = 0o100 if st.st_uid == user.pw_uid else 0o010 if st.st_gid == user.pw_gid else 0o001
        if not st.st_mode & bit:
            return False
    return True
