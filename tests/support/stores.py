"""Stores for agent tests: a file:// directory or a moto bucket, for in-process and CLI use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobmesh.agent.store import Store, open_store
from tests.support.s3 import S3Server


class StoreSpec:
    """A store the agent writes to, reachable both in-process and from a CLI subprocess."""

    def __init__(self, url: str, s3: S3Server | None = None, bucket: str = "",
                 root: Path | None = None) -> None:
        self.url = url
        self.s3 = s3
        self.bucket = bucket
        self.root = root

    @property
    def endpoint(self) -> str | None:
        return self.s3.endpoint if self.s3 else None

    def open(self) -> Store:
        return open_store(self.url, s3_endpoint=self.endpoint)

    def cli_args(self, job: str) -> list[str]:
        args = ["--store", self.url, "--job", job]
        return args + (["--s3-endpoint", self.s3.endpoint] if self.s3 else [])

    def has_partial_upload(self, job: str) -> str | None:
        """The snapshot id of an upload in progress (or abandoned), if any."""
        if self.s3 is None:
            assert self.root is not None
            for p in (self.root / job / "snapshots").glob("*/.data.tar.zst.*.partial"):
                return p.parent.name
            return None
        uploads = s3_client(self.s3).list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        for u in uploads:
            return str(u["Key"]).split("/snapshots/")[1].split("/")[0]
        return None

    def corrupt(self, key: str, offset_fraction: float = 0.5) -> None:
        """Flip one byte of a stored object, in place."""
        if self.s3 is None:
            assert self.root is not None
            path = self.root / key
            data = bytearray(path.read_bytes())
            data[int(len(data) * offset_fraction)] ^= 0x01
            path.write_bytes(bytes(data))
            return
        client = s3_client(self.s3)
        full = f"jobs/{key}"
        data = bytearray(client.get_object(Bucket=self.bucket, Key=full)["Body"].read())
        data[int(len(data) * offset_fraction)] ^= 0x01
        client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))


def s3_client(server: S3Server):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def new_store_spec(request: pytest.FixtureRequest, kind: str, parent: Path) -> StoreSpec:
    """An empty file:// store in a new directory under ``parent`` (readable by the postgres
    OS user when ``parent`` is: restore_command runs wal-fetch as that user), or an empty
    bucket on moto's S3 server."""
    if kind == "file":
        root = parent / f"store-{os.urandom(4).hex()}"
        root.mkdir()
        root.chmod(0o755)
        return StoreSpec(f"file://{root}", root=root)
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.create_bucket(f"store-{os.urandom(4).hex()}")
    return StoreSpec(f"s3://{bucket}/jobs", server, bucket)
