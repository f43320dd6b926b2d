"""moto's S3 API server as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobmesh.agent.postgres import free_port


@dataclass
class S3Server:
    """moto's S3 API server on loopback; ``env`` holds what a client needs."""

    endpoint: str
    proc: subprocess.Popen[bytes]

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> str:
        import boto3  # moto depends on it; test setup only

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start moto in server mode on a free loopback port; stop it on the way out."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    # Its request log is not read: a pipe nobody drains would block moto after ~64 KiB.
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield S3Server(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Block until something accepts on the port (a connect either succeeds or is refused)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            # Not listening yet: wait on the process for a moment instead of sleeping blindly.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
    raise RuntimeError("moto_server did not start listening")
