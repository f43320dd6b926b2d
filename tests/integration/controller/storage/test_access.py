"""Scoped store credentials against moto with IAM enforced: what a sidecar's key may do,
and may not, in a real S3 API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from jobmesh.agent.store import StoreError, get_bytes, open_store, put_bytes
from jobmesh.controller.storage.access import (
    AccessError,
    Credentials,
    StoreAccess,
    ensure_key_file,
    sidecar_policy,
    user_name,
)
from tests.support.s3 import S3Server

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[4]


@pytest.fixture
def bucket(iam_s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket with a little of two jobs in it; the controller's (admin) key in the env."""
    for k, v in iam_s3_server.env.items():
        monkeypatch.setenv(k, v)
    name = iam_s3_server.create_bucket(f"access-{os.urandom(4).hex()}")
    s3 = iam_s3_server.client()
    for key in ("jobs/alpha/snapshots/1.json", "jobs/beta/snapshots/1.json",
                "jobs/_objects/ab/cd", "jobs/_store/keys/k1.json"):
        s3.put_object(Bucket=name, Key=key, Body=b"{}")
    yield name


def refused(call: object) -> str:
    """The error code S3 answered a call with (the call must fail)."""
    assert callable(call)
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


async def test_a_jobs_key_reads_and_adds_to_its_own_prefix_and_deletes_nothing(
        iam_s3_server: S3Server, bucket: str) -> None:
    access = StoreAccess(f"s3://{bucket}/jobs", iam_endpoint=iam_s3_server.endpoint)
    key = await access.issue("alpha")
    s3 = iam_s3_server.client(key=(key.access_key_id, key.secret_access_key))

    # What its agent needs works: its own prefix, the shared objects, leases, the key file.
    s3.put_object(Bucket=bucket, Key="jobs/alpha/wal/000000010000000000000001.zst", Body=b"w")
    assert s3.get_object(Bucket=bucket, Key="jobs/alpha/snapshots/1.json")["Body"].read()
    s3.put_object(Bucket=bucket, Key="jobs/_objects/ef/01", Body=b"chunk", IfNoneMatch="*")
    assert s3.get_object(Bucket=bucket, Key="jobs/_objects/ab/cd")["Body"].read() == b"{}"
    s3.put_object(Bucket=bucket, Key="jobs/_locks/lease-1-x", Body=b"")
    assert s3.get_object(Bucket=bucket, Key="jobs/_store/keys/k1.json")["Body"].read()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="jobs/alpha/")["Contents"]
    assert {o["Key"] for o in listed} >= {"jobs/alpha/snapshots/1.json"}

    # What it must not: delete anything, touch another job, change the key file.
    for doomed in ("jobs/alpha/snapshots/1.json", "jobs/beta/snapshots/1.json",
                   "jobs/_objects/ab/cd"):
        assert refused(lambda k=doomed: s3.delete_object(Bucket=bucket, Key=k)) == "AccessDenied"
    assert refused(lambda: s3.get_object(Bucket=bucket, Key="jobs/beta/snapshots/1.json")
                   ) == "AccessDenied"
    assert refused(lambda: s3.put_object(Bucket=bucket, Key="jobs/beta/snapshots/2.json",
                                         Body=b"{}")) == "AccessDenied"
    assert refused(lambda: s3.put_object(Bucket=bucket, Key="jobs/_store/keys/k2.json",
                                         Body=b"{}")) == "AccessDenied"
    for other in ("jobs/beta/", "jobs/", "jobs/_objects/", ""):  # listing is scoped too
        assert refused(lambda p=other: s3.list_objects_v2(Bucket=bucket, Prefix=p)
                       ) == "AccessDenied", other
    admin = iam_s3_server.client()
    assert admin.get_object(Bucket=bucket, Key="jobs/beta/snapshots/1.json")["Body"].read()


async def test_shared_objects_are_only_added_never_replaced(
        iam_s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key = await StoreAccess(f"s3://{bucket}/jobs",
                            iam_endpoint=iam_s3_server.endpoint).issue("alpha")
    s3 = iam_s3_server.client(key=(key.access_key_id, key.secret_access_key))
    # Without If-None-Match: refused, whether the name is taken or not.
    for name in ("jobs/_objects/ab/cd", "jobs/_objects/ab/new"):
        assert refused(lambda n=name: s3.put_object(Bucket=bucket, Key=n, Body=b"bad")
                       ) == "AccessDenied", name
    # With it: a taken name is refused by S3 itself, and the object stays as it was.
    assert refused(lambda: s3.put_object(Bucket=bucket, Key="jobs/_objects/ab/cd",
                                         Body=b"bad", IfNoneMatch="*")) == "PreconditionFailed"
    # A multipart upload's steps cannot carry the header; its completion must.
    up = s3.create_multipart_upload(Bucket=bucket, Key="jobs/_objects/ab/big")["UploadId"]
    etag = s3.upload_part(Bucket=bucket, Key="jobs/_objects/ab/big", UploadId=up,
                          PartNumber=1, Body=b"big")["ETag"]
    parts = {"Parts": [{"PartNumber": 1, "ETag": etag}]}
    assert refused(lambda: s3.complete_multipart_upload(
        Bucket=bucket, Key="jobs/_objects/ab/big", UploadId=up, MultipartUpload=parts)
                   ) == "AccessDenied"
    s3.complete_multipart_upload(Bucket=bucket, Key="jobs/_objects/ab/big", UploadId=up,
                                 MultipartUpload=parts, IfNoneMatch="*")
    # Its own prefix is its own to rewrite (a manifest, a lease's renewal).
    s3.put_object(Bucket=bucket, Key="jobs/alpha/snapshots/1.json", Body=b"{ }")

    # Our store client writes objects so: the second writer of a name finds it taken.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret_access_key)
    store = open_store(f"s3://{bucket}/jobs", s3_endpoint=iam_s3_server.endpoint)
    try:
        assert await store.put_new("_objects/ef/02", b"first") is True
        assert await store.put_new("_objects/ef/02", b"second") is False
        assert await store.put_new("_objects/ab/cd", b"bad") is False
    finally:
        await store.close()
    admin = iam_s3_server.client()
    assert admin.get_object(Bucket=bucket, Key="jobs/_objects/ef/02")["Body"].read() == b"first"
    assert admin.get_object(Bucket=bucket, Key="jobs/_objects/ab/cd")["Body"].read() == b"{}"


async def test_our_store_client_says_plainly_when_s3_refuses(
        iam_s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key = await StoreAccess(f"s3://{bucket}/jobs",
                            iam_endpoint=iam_s3_server.endpoint).issue("alpha")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret_access_key)
    store = open_store(f"s3://{bucket}/jobs", s3_endpoint=iam_s3_server.endpoint)
    try:
        await put_bytes(store, "alpha/dumps/x", b"ok")
        assert await get_bytes(store, "alpha/dumps/x") == b"ok"
        with pytest.raises(StoreError, match=r"S3 refused alpha/dumps/x: AccessDenied"):
            await store.delete("alpha/dumps/x")
        with pytest.raises(StoreError, match=r"AccessDenied"):
            await get_bytes(store, "beta/snapshots/1.json")
    finally:
        await store.close()


async def test_a_new_key_retires_the_old_and_revoking_ends_both(
        iam_s3_server: S3Server, bucket: str) -> None:
    access = StoreAccess(f"s3://{bucket}/jobs", iam_endpoint=iam_s3_server.endpoint)
    first = await access.issue("alpha")
    second = await access.issue("alpha")  # (a Secret lost and remade)

    def reads(key: Credentials) -> bool:
        s3 = iam_s3_server.client(key=(key.access_key_id, key.secret_access_key))
        try:
            s3.get_object(Bucket=bucket, Key="jobs/alpha/snapshots/1.json")
            return True
        except ClientError:
            return False
    assert not reads(first) and reads(second)
    iam = iam_s3_server.client("iam")
    user = iam.get_user(UserName=user_name("alpha"))["User"]
    assert user["Path"] == "/jobmesh/"
    policy = iam.get_user_policy(UserName=user_name("alpha"), PolicyName="jobmesh-store")
    doc = policy["PolicyDocument"]
    assert (json.loads(doc) if isinstance(doc, str) else doc) == sidecar_policy(
        bucket, "jobs", "alpha")

    await access.revoke("alpha")
    assert not reads(second)
    assert refused(lambda: iam.get_user(UserName=user_name("alpha"))) == "NoSuchEntity"
    await access.revoke("alpha")  # (nothing left: no error)


async def test_the_agent_hosts_key_covers_every_job_and_still_deletes_nothing(
        iam_s3_server: S3Server, bucket: str) -> None:
    access = StoreAccess(f"s3://{bucket}/jobs", iam_endpoint=iam_s3_server.endpoint)
    key = await access.issue(None)
    s3 = iam_s3_server.client(key=(key.access_key_id, key.secret_access_key))
    for job in ("alpha", "beta"):
        s3.put_object(Bucket=bucket, Key=f"jobs/{job}/wal/x", Body=b"w")
        assert s3.get_object(Bucket=bucket, Key=f"jobs/{job}/snapshots/1.json")
        assert refused(lambda j=job: s3.delete_object(
            Bucket=bucket, Key=f"jobs/{j}/snapshots/1.json")) == "AccessDenied"
    try:  # a batch delete: refused whole, or key by key
        errors = s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": "jobs/alpha/wal/x"}]}).get("Errors", [])
        assert [e["Code"] for e in errors] == ["AccessDenied"]
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "AccessDenied"
    assert s3.head_object(Bucket=bucket, Key="jobs/alpha/wal/x")
    assert refused(lambda: s3.put_object(Bucket=bucket, Key="jobs/_store/keys/k2.json",
                                         Body=b"{}")) == "AccessDenied"
    assert refused(lambda: s3.put_object(Bucket=bucket, Key="elsewhere/x", Body=b"")
                   ) == "AccessDenied"
    await access.revoke(None)


async def test_the_controller_writes_the_key_file_sidecars_may_only_read(
        iam_s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in iam_s3_server.env.items():
        monkeypatch.setenv(k, v)
    name = iam_s3_server.create_bucket(f"keys-{os.urandom(4).hex()}")
    store = open_store(f"s3://{name}/jobs", s3_endpoint=iam_s3_server.endpoint)
    try:
        await ensure_key_file(store)
        files = [o.key for o in await store.list("_store/keys/")]
        await ensure_key_file(store)  # (once: a second start finds it)
        assert [o.key for o in await store.list("_store/keys/")] == files and len(files) == 1
    finally:
        await store.close()


async def test_refusals_no_retry_can_fix_are_permanent(iam_s3_server: S3Server, bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    access = StoreAccess(f"s3://{bucket}/jobs", iam_endpoint=iam_s3_server.endpoint)
    key = await access.issue("alpha")  # a sidecar's key has no IAM rights
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret_access_key)
    with pytest.raises(AccessError, match=r"cannot issue store credentials for jm-beta: "
                                          r"AccessDenied") as caught:
        await access.issue("beta")
    assert caught.value.permanent


def test_scoped_credentials_need_an_s3_store() -> None:
    with pytest.raises(AccessError, match=r"need an s3:// store"):
        StoreAccess("file:///var/lib/jobmesh/store")


def test_the_policies_in_manifests_are_the_ones_the_controller_issues() -> None:
    policies = REPO / "manifests" / "policies"
    job = json.loads((policies / "aws-job-sidecar.json").read_text())
    assert job == sidecar_policy("BUCKET", "PREFIX", "JOB_ID")
    minio = REPO / "manifests" / "components" / "minio" / "sidecars-policy.json"
    assert json.loads(minio.read_text()) == sidecar_policy("jobmesh-dev", "jobs", None,
                                                           conditional_writes=False)


def test_the_controller_refuses_scoped_credentials_for_a_file_store(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "jobmesh", "controller", "--catalog-dsn",
                          "postgresql://nobody@127.0.0.1:1/none", "--state-dir", str(tmp_path),
                          "--store-credentials", "scoped"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "--store-credentials scoped: scoped store credentials need an s3:// store" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
