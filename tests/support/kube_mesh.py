"""The mesh on the Kubernetes backend: the API emulator, the test kubelet and a moto store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from jobmesh.agent.postgres import free_port
from jobmesh.controller.catalog.db import Catalog
from tests.support.cleanup import remove_later
from tests.support.k8s_emulator import K8sEmulator
from tests.support.kubelet import Kubelet
from tests.support.mesh import Mesh
from tests.support.process import LoggedProcess
from tests.support.s3 import S3Server

NS = "jm"
LEASE = 3  # seconds: a killed leader is replaced within about five (failover tests)
# Everywhere else the lease only has to hold: the emulator and kubelet share the test's
# process (and its GIL) with several pods, and on a loaded machine a renewal can take
# seconds; a 3 s lease then lapses, the leader exits, and a job stalls half-made.
STEADY_LEASE = 30
S3_SECRET = "jobmesh-s3"


@dataclass
class KubeMesh:
    mesh: Mesh
    emulator: K8sEmulator
    kubelet: Kubelet
    store: str
    s3_endpoint: str
    replicas: list[LoggedProcess] = field(default_factory=list)
    lease: float = STEADY_LEASE  # seconds; failover tests set LEASE

    def controller_args(self, identity: str) -> list[str]:
        return ["--backend", "kubernetes", "--kube-api", self.emulator.url, "--namespace", NS,
                "--image", "jobmesh:test", "--router-service", "127.0.0.1",
                "--store", self.store, "--s3-endpoint", self.s3_endpoint,
                "--s3-credentials-secret", S3_SECRET,
                "--lease-duration", f"{self.lease:g}", "--identity", identity,
                "--idle-timeout", "0"]

    def start_controller(self, identity: str = "one") -> LoggedProcess:
        controller = self.mesh.start_controller(*self.controller_args(identity))
        self.replicas.append(controller)
        return controller

    def start_replica(self, identity: str) -> LoggedProcess:
        """Another controller on the same catalog, cluster and state (its own API port)."""
        m = self.mesh
        cmd = [sys.executable, "-m", "jobmesh", "controller", "--catalog-dsn", m.catalog_dsn,
               "--state-dir", str(m.root), "--api-listen", f"127.0.0.1:{free_port()}",
               "--health-interval", "0.5", "--resync-interval", "5",
               *self.controller_args(identity)]
        replica = LoggedProcess(identity, cmd, m.root / f"controller-{identity}.log",
                                env={**os.environ, **m.controller_env})
        self.replicas.append(replica)
        replica.wait_for_log(r"controller API listening on")
        return replica

    def pod(self, job_id: str) -> dict[str, Any] | None:
        return self.emulator.get("pods", NS, f"job-{job_id}")

    def assert_clean(self) -> None:
        """Nothing the controller sent was refused; the kubelet had no trouble of its own."""
        assert self.emulator.rejected == []
        assert self.kubelet.errors == []

    def stop(self) -> None:
        for p in self.replicas:
            p.stop(timeout=30)
        self.mesh.stop()
        self.kubelet.stop()


@contextlib.asynccontextmanager
async def running_kube_mesh(pg_root: Path, catalog_dsn: str, catalog: Catalog,
                            s3_server: S3Server) -> AsyncIterator[KubeMesh]:
    """Emulator and kubelet started, the S3 secret an operator would make created; all
    stopped (and the kubelet's processes checked gone) on the way out."""
    root = pg_root / f"kube-{os.urandom(4).hex()}"
    root.mkdir(mode=0o755)
    bucket = s3_server.create_bucket(f"kube-{os.urandom(4).hex()}")
    emulator = K8sEmulator().start()
    kubelet = Kubelet(emulator.url, NS, root / "kubelet", probe_period=0.1, max_grace=3)
    k = KubeMesh(Mesh(root, catalog_dsn, catalog), emulator, kubelet, f"s3://{bucket}/jobs",
                 s3_server.endpoint)
    try:
        with emulator.api_client() as api:  # what an operator creates beside the controller
            env = s3_server.env
            keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            await asyncio.to_thread(client.CoreV1Api(api).create_namespaced_secret, NS, {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET},
                "stringData": {key: env[key] for key in keys}})
        kubelet.start()
        emulator.serve_pod_logs(kubelet.read_log)
        yield k
    finally:
        await asyncio.to_thread(k.stop)
        assert kubelet.pids() == []
        emulator.stop()
        # To read the pods' logs after a failure: JOBMESH_KEEP_TEST_DIRS=/some/dir.
        if keep := os.environ.get("JOBMESH_KEEP_TEST_DIRS"):
            shutil.copytree(root, Path(keep) / root.name, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.s.PGSQL*"))
        remove_later(root)


