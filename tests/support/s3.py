"""moto's S3 API server as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobmesh.agent.postgres import free_port


@dataclass
class S3Server:
    """moto's S3 API server on loopback; ``env`` holds what a client needs."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    access_key: str = "testing"  # (any key, until IAM is enforced)
    secret_key: str = "testing"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, service: str = "s3", key: tuple[str, str] | None = None) -> Any:
        """A boto3 client of the server, with its admin key or ``key`` (id, secret)."""
        import boto3  # moto depends on it; test setup only

        key_id, secret = key or (self.access_key, self.secret_key)
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def enforce_iam(self) -> None:
        """From now on moto checks every request's signature and IAM policies, as AWS does:
        the key becomes an admin user's (every action allowed), and any other key that
        IAM did not issue is refused. moto checks actions and resources, not conditions
        (the ``s3:prefix`` of a listing)."""
        iam = self.client("iam")
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                         method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()


@contextlib.contextmanager
def running_s3_server(*, iam: bool = False) -> Iterator[S3Server]:
    """Start moto in server mode on a free loopback port; stop it on the way out.
    ``iam``: every request checked against IAM as AWS does (``moto_iam_server.py``,
    ``S3Server.enforce_iam``)."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    argv = ([sys.executable, str(Path(__file__).with_name("moto_iam_server.py"))] if iam
            else [moto])
    # Its request log is not read: a pipe nobody drains would block moto after ~64 KiB.
    proc = subprocess.Popen([*argv, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        server = S3Server(f"http://127.0.0.1:{port}", proc)
        if iam:
            server.enforce_iam()
        yield server
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
