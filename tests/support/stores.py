"""Stores for agent tests: a file:// directory or a moto bucket, for in-process and CLI use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobmesh.agent.cas.leases import LOCKS_PREFIX, parse
from jobmesh.agent.manifest import Manifest, snapshot_manifest_key
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

    def keys(self, prefix: str) -> list[str]:
        """The keys stored under ``prefix``, sorted (uploads still in progress are not)."""
        if self.s3 is None:
            assert self.root is not None
            top = self.root / prefix.split("/", 1)[0]
            found = top.rglob("*") if top.is_dir() else iter(())
            keys = (str(p.relative_to(self.root)) for p in found if p.is_file()
                    and not (p.name.startswith(".") and p.name.endswith(".partial")))
            return sorted(k for k in keys if k.startswith(prefix))
        pages = s3_client(self.s3).get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"jobs/{prefix}")
        return sorted(str(o["Key"]).removeprefix("jobs/")
                      for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        if self.s3 is None:
            assert self.root is not None
            return (self.root / key).read_bytes()
        body = s3_client(self.s3).get_object(Bucket=self.bucket, Key=f"jobs/{key}")["Body"]
        return bytes(body.read())

    def read_manifest(self, job: str, sid: str) -> Manifest:
        return Manifest.from_json(self.read(snapshot_manifest_key(job, sid)))

    def leases(self, what: str) -> list[str]:
        """The keys of the writers' leases (``cas/leases.py``) held for ``what``, e.g.
        ``snapshot of <job>``: a snapshot in flight, or one whose writer died."""
        keys = self.keys(LOCKS_PREFIX)
        released = {e.id for k in keys if (e := parse(k)) and e.kind == "done"}
        return [k for k in keys if (e := parse(k)) and e.kind == "lease"
                and e.id not in released and self.read(k) == what.encode()]

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
