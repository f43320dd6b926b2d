"""Scoped store access: what a sidecar may do in an S3 store, and the IAM users that carry it.

A job's sidecar reads and adds to its own job's part of the store (``<prefix>/<job>/``),
reads and adds content-addressed objects (``_objects/``: shared, so a restore can
read what another job's snapshot stored first), adds lease keys (``_locks/``) and
reads the store's key file (``_store/keys/``). It never deletes and never
changes the store's key file: the controller's collector deletes, and the
controller writes the key file when it starts. The policy says so twice: it
grants no delete, and it denies every delete explicitly, so no other policy
attached to the same user can grant one.

``--store-credentials scoped`` makes the controller issue them through the IAM
API (AWS, or any store that speaks it): on Kubernetes, an IAM user per job
(``jm-<job>``, path ``/jobmesh/``) whose access key goes into the job's own
Secret; on the local backend, one user for the agent host (``jm--agent-host``),
which runs every job's agent in one process, so it gets every job's prefix but
still no delete. ``manifests/policies/`` holds the same documents for an
operator to apply by hand (AWS IAM and MinIO).

Listing is scoped with ``s3:prefix`` conditions; S3 has no way to scope it by
resource. Shared objects may only be added, never replaced: every write that
creates an object under ``_objects/`` must carry ``If-None-Match: *`` (the
``s3:if-none-match`` condition key; ``s3:ObjectCreationOperation`` exempts the
steps of a multipart upload, which cannot carry it), so a sidecar cannot
overwrite a chunk that other jobs' snapshots name. MinIO's policy
(``conditional_writes=False``) leaves the statement out, and that to our code: MinIO's
documented condition keys do not include these, and no MinIO runs here to try.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from jobmesh.agent.cas.keys import KEYS_PREFIX, load_keyring, store_key_from_env
from jobmesh.agent.cas.leases import LOCKS_PREFIX
from jobmesh.agent.cas.objects import OBJECTS_PREFIX
from jobmesh.agent.store import Store

log = logging.getLogger("jobmesh.controller.access")

USER_PATH = "/jobmesh/"
POLICY_NAME = "jobmesh-store"
HOST_USER = "jm--agent-host"  # (a job id starts with a letter or digit: no job's user)
# What no sidecar may do anywhere in the bucket.
DENIED = ["s3:DeleteObject", "s3:DeleteObjectVersion", "s3:PutLifecycleConfiguration",
          "s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketVersioning",
          "s3:PutObjectAcl", "s3:PutBucketAcl", "s3:DeleteBucket"]


# IAM's answers no retry changes: the controller's own rights, or a policy IAM refuses.
PERMANENT = {"AccessDenied", "AccessDeniedException", "InvalidClientTokenId",
             "SignatureDoesNotMatch", "MalformedPolicyDocument", "LimitExceeded",
             "ValidationError", "InvalidInput"}


class AccessError(Exception):
    """Credentials could not be issued or revoked (the message says why); ``permanent``:
    retrying will not help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


def s3_location(store_url: str) -> tuple[str, str]:
    """(bucket, prefix) of an ``s3://`` store URL; AccessError for any other store."""
    parsed = urlparse(store_url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise AccessError(f"scoped store credentials need an s3:// store, not {store_url!r} "
                          "(a file:// store is guarded by its directory's owner and mode)")
    return parsed.netloc, parsed.path.strip("/")


def user_name(job: str | None) -> str:
    """The IAM user of a job's sidecar (``jm-<job>``: at most 62 of IAM's 64 characters),
    or of the local agent host (None)."""
    return HOST_USER if job is None else f"jm-{job}"


def sidecar_policy(bucket: str, prefix: str, job: str | None, *,
                   conditional_writes: bool = True) -> dict[str, Any]:
    """The IAM policy of one job's sidecar, or (``job`` None) of an agent host that
    serves every job of the store. ``conditional_writes``: shared objects are written
    only with ``If-None-Match`` (AWS; MinIO's policies have no such condition)."""
    base = f"{prefix}/" if prefix else ""
    own = f"{base}{job}/" if job is not None else base
    key = f"arn:aws:s3:::{bucket}/"
    create_only = [{
        "Sid": "SharedObjectsAreNeverReplaced", "Effect": "Deny", "Action": ["s3:PutObject"],
        "Resource": [f"{key}{base}{OBJECTS_PREFIX}*"],
        "Condition": {"Null": {"s3:if-none-match": "true"},
                      "Bool": {"s3:ObjectCreationOperation": "true"}}}]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "OwnJob", "Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload",
                        "s3:ListMultipartUploadParts"],
             "Resource": [f"{key}{own}*"]},
            {"Sid": "SharedObjects", "Effect": "Allow",
             "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
             "Resource": [f"{key}{base}{OBJECTS_PREFIX}*"]},
            {"Sid": "Leases", "Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": [f"{key}{base}{LOCKS_PREFIX}*"]},
            {"Sid": "StoreKeys", "Effect": "Allow", "Action": ["s3:GetObject"],
             "Resource": [f"{key}{base}{KEYS_PREFIX}*"]},
            {"Sid": "List", "Effect": "Allow", "Action": ["s3:ListBucket"],
             "Resource": [f"arn:aws:s3:::{bucket}"],
             "Condition": {"StringLike": {"s3:prefix": [
                 f"{own}*", f"{base}{LOCKS_PREFIX}*", f"{base}{KEYS_PREFIX}*"]}}},
            {"Sid": "NeverDelete", "Effect": "Deny", "Action": DENIED,
             "Resource": [f"arn:aws:s3:::{bucket}", f"{key}*"]},
            # The key file is the controller's (an agent host's OwnJob covers it).
            {"Sid": "StoreKeysReadOnly", "Effect": "Deny", "Action": ["s3:PutObject"],
             "Resource": [f"{key}{base}_store/*"]},
            *(create_only if conditional_writes else []),
        ],
    }


class StoreAccess:
    """Issues and revokes sidecars' store credentials through the IAM API, with the
    controller's own credentials (which need iam:CreateUser, PutUserPolicy,
    CreateAccessKey, ListAccessKeys, DeleteAccessKey, DeleteUserPolicy and DeleteUser on
    ``arn:aws:iam::*:user/jobmesh/*``)."""

    def __init__(self, store_url: str, *, iam_endpoint: str | None = None) -> None:
        self.bucket, self.prefix = s3_location(store_url)
        # None: botocore's own resolution ($AWS_ENDPOINT_URL_IAM, $AWS_ENDPOINT_URL, AWS).
        self.endpoint = iam_endpoint or None

    @contextlib.asynccontextmanager
    async def _iam(self) -> AsyncIterator[Any]:
        from aiobotocore.session import get_session

        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        async with get_session().create_client("iam", endpoint_url=self.endpoint,
                                               region_name=region or "us-east-1") as iam:
            yield iam

    async def issue(self, job: str | None) -> Credentials:
        """A new access key for the job's user (made, with its policy, if missing); the
        user's earlier keys are deleted, so only the newest works."""
        name = user_name(job)
        policy = json.dumps(sidecar_policy(self.bucket, self.prefix, job))
        async with self._iam() as iam:
            try:
                with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
                    await iam.create_user(UserName=name, Path=USER_PATH,
                                          Tags=[{"Key": "jobmesh-store",
                                                 "Value": self._store_tag()}])
                await iam.put_user_policy(UserName=name, PolicyName=POLICY_NAME,
                                          PolicyDocument=policy)
                await self._delete_keys(iam, name)
                key = (await iam.create_access_key(UserName=name))["AccessKey"]
            except Exception as exc:
                raise AccessError(f"cannot issue store credentials for {name}: "
                                  f"{_why(exc)}", permanent=_code(exc) in PERMANENT) from exc
        log.info("issued store credentials %s for %s", key["AccessKeyId"], name)
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    async def revoke(self, job: str | None) -> None:
        """Delete the job's user, its keys and its policy (nothing: there was none)."""
        name = user_name(job)
        async with self._iam() as iam:
            try:
                await self._delete_keys(iam, name)
                with contextlib.suppress(iam.exceptions.NoSuchEntityException):
                    await iam.delete_user_policy(UserName=name, PolicyName=POLICY_NAME)
                await iam.delete_user(UserName=name)
            except iam.exceptions.NoSuchEntityException:
                return
            except Exception as exc:
                raise AccessError(f"cannot revoke the store credentials of {name}: "
                                  f"{_why(exc)}", permanent=_code(exc) in PERMANENT) from exc
        log.info("revoked the store credentials of %s", name)

    @staticmethod
    async def _delete_keys(iam: Any, name: str) -> None:
        for key in (await iam.list_access_keys(UserName=name))["AccessKeyMetadata"]:
            await iam.delete_access_key(UserName=name, AccessKeyId=key["AccessKeyId"])

    def _store_tag(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")[:256]


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _why(exc: Exception) -> str:
    """One line: an IAM error's code and message, else the exception's text."""
    error = getattr(exc, "response", {}).get("Error", {})
    if error:
        return f"{error.get('Code')}: {error.get('Message')}".rstrip(": ")
    return str(exc) or type(exc).__name__


async def ensure_key_file(store: Store) -> None:
    """The store's key file, written now if it has none: with scoped credentials a sidecar
    may only read it (with ``$JOBMESH_STORE_KEY`` set, the store is encrypted)."""
    await load_keyring(store, store_key_from_env(), create=True)
