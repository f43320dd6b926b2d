"""The ``s3://bucket/prefix`` store, on aiobotocore (any S3 API: AWS, MinIO, Ceph, moto).

Uploads are multipart with several parts in flight; a failed upload is
aborted, so no partial object ever appears. Every request is retried with
exponential backoff on 5xx answers, throttling and dropped connections;
downloads resume from the byte they reached. Endpoint, region and
credentials come from the usual ``AWS_*`` variables (``AWS_ENDPOINT_URL``
too) unless ``--s3-endpoint`` is given. ``put_new`` writes with
``If-None-Match: *``, so a shared object is added once and never replaced
(the sidecars' IAM policy refuses writes to ``_objects/`` without it).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from . import CHUNK, Digest, NotFound, ObjectInfo, Stored, StoreError

PART_SIZE = 16 << 20
PARTS_IN_FLIGHT = 4
# Our own retries (botocore's are off): 0.1 s doubling, so a dead endpoint is
# reported after about 3 s and a flaky one gets six tries per request.
ATTEMPTS = int(os.environ.get("JOBMESH_S3_ATTEMPTS", "6"))
T = TypeVar("T")
log = logging.getLogger("jobmesh.agent.store")

_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "SlowDown", "RequestTimeout",
                    "ServiceUnavailable", "Throttling", "RequestTimeTooSkewed",
                    # a conditional write raced another write of the key: try again
                    "ConditionalRequestConflict"}


class _Exists(StoreError):
    """A conditional write found the key taken (412 Precondition Failed)."""


class _NoConditionalWrites(StoreError):
    """The endpoint does not implement If-None-Match on writes (501)."""


class S3Store:
    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._conditional_writes = True  # until the endpoint says it has none (501)

    async def _s3(self) -> Any:
        if self._client is None:
            config = AioConfig(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                s3={"addressing_style": "path"},
                max_pool_connections=PARTS_IN_FLIGHT * 2,
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            self._client = await self._stack.enter_async_context(
                get_session().create_client(
                    "s3", endpoint_url=self.endpoint, region_name=region or "us-east-1",
                    config=config,
                )
            )
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        delay = 0.1
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await op()
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise NotFound(f"no object {what} in {self.url}") from exc
                if code in ("PreconditionFailed", "412"):
                    raise _Exists(f"{what} exists in {self.url}") from exc
                if code in ("NotImplemented", "501"):
                    raise _NoConditionalWrites(f"S3 refused {what}: {code}") from exc
                if code == "NoSuchBucket":
                    raise StoreError(f"bucket {self.bucket!r} does not exist") from exc
                if code not in _TRANSIENT_CODES and status not in _TRANSIENT_CODES:
                    raise StoreError(f"S3 refused {what}: {code or status}") from exc
                last: Exception = exc
            except NoCredentialsError as exc:
                raise StoreError(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from exc
            except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = exc
            if attempt < ATTEMPTS:
                await asyncio.sleep(delay * (0.5 + random.random()))  # backoff with jitter
                delay = min(delay * 2, 5.0)
        raise StoreError(f"S3 {what} failed after {ATTEMPTS} attempts: {last}") from last

    async def put(self, key: str, chunks: AsyncIterator[bytes]) -> Stored:
        s3 = await self._s3()
        digest = Digest()
        buf = bytearray()
        upload_id: str | None = None
        parts: list[asyncio.Task[dict[str, Any]]] = []
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)
        full_key = self._key(key)

        async def send_part(number: int, body: bytes) -> dict[str, Any]:
            try:
                resp = await self._retry(f"{key} part {number}", lambda: s3.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                    Body=body))
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                slots.release()

        try:
            async for chunk in chunks:
                digest.update(chunk)
                buf += chunk
                while len(buf) >= PART_SIZE:
                    if upload_id is None:
                        resp = await self._retry(key, lambda: s3.create_multipart_upload(
                            Bucket=self.bucket, Key=full_key))
                        upload_id = resp["UploadId"]
                    body, buf = bytes(buf[:PART_SIZE]), buf[PART_SIZE:]
                    await slots.acquire()  # bounds memory: at most N parts buffered
                    parts.append(asyncio.create_task(send_part(len(parts) + 1, body)))
                    _raise_failed(parts)
            if upload_id is None:
                body = bytes(buf)
                await self._retry(key, lambda: s3.put_object(
                    Bucket=self.bucket, Key=full_key, Body=body))
            else:
                if buf:
                    await slots.acquire()
                    parts.append(asyncio.create_task(send_part(len(parts) + 1, bytes(buf))))
                done = await asyncio.gather(*parts)
                await self._retry(key, lambda: s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                    MultipartUpload={"Parts": done}))
        except BaseException:
            for t in parts:
                t.cancel()
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            raise
        return Stored(key, digest.size, digest.hexdigest())

    async def put_new(self, key: str, data: bytes) -> bool:
        s3 = await self._s3()
        full_key = self._key(key)
        if self._conditional_writes:
            try:
                await self._retry(key, lambda: s3.put_object(
                    Bucket=self.bucket, Key=full_key, Body=data, IfNoneMatch="*"))
                return True
            except _Exists:
                return False  # (or our own first try, whose answer was lost)
            except _NoConditionalWrites:
                log.warning("%s does not implement conditional writes (If-None-Match): "
                            "shared objects are checked, then written", self.url)
                self._conditional_writes = False
        if await self.size(key) is not None:
            return False
        await self._retry(key, lambda: s3.put_object(Bucket=self.bucket, Key=full_key,
                                                     Body=data))
        return True

    async def get(self, key: str) -> AsyncGenerator[bytes, None]:
        s3 = await self._s3()
        offset = 0
        failures = 0
        progressed_to = 0  # a resume that got further resets the failure count
        while True:
            rng = {"Range": f"bytes={offset}-"} if offset else {}
            resp = await self._retry(key, partial(s3.get_object, Bucket=self.bucket,
                                                  Key=self._key(key), **rng))
            body = resp["Body"]
            try:
                while chunk := await body.read(CHUNK):
                    offset += len(chunk)
                    yield chunk
                return
            except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                # The connection dropped mid-object: resume where it stopped.
                failures = 1 if offset > progressed_to else failures + 1
                progressed_to = offset
                if failures >= ATTEMPTS:
                    raise StoreError(f"S3 download of {key} kept failing: {exc}") from exc
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
            finally:
                body.close()

    async def size(self, key: str) -> int | None:
        s3 = await self._s3()
        try:
            resp = await self._retry(key, lambda: s3.head_object(
                Bucket=self.bucket, Key=self._key(key)))
        except NotFound:
            return None
        return int(resp["ContentLength"])

    async def list(self, prefix: str) -> list[ObjectInfo]:
        s3 = await self._s3()
        out: list[ObjectInfo] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            resp = await self._retry(f"list {prefix}", partial(
                s3.list_objects_v2, Bucket=self.bucket, Prefix=self._key(prefix), **extra))
            for obj in resp.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"])))
            if not resp.get("IsTruncated"):
                return out
            token = resp["NextContinuationToken"]

    async def delete(self, key: str) -> None:
        s3 = await self._s3()
        await self._retry(key, lambda: s3.delete_object(Bucket=self.bucket, Key=self._key(key)))

    async def delete_many(self, keys: builtins.list[str]) -> None:
        s3 = await self._s3()
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            resp = await self._retry(f"delete of {len(batch)} objects", partial(
                s3.delete_objects, Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True}))
            if errors := resp.get("Errors"):
                raise StoreError(f"S3 refused to delete {errors[0].get('Key')}: "
                                 f"{errors[0].get('Code')}")

    async def abort_incomplete(self, older_than: float, *, dry_run: bool = False) -> int:
        """Abort multipart uploads under our prefix started over ``older_than`` s ago (an
        agent killed mid-upload leaves one, which S3 keeps, and bills, until aborted)."""
        s3 = await self._s3()
        cutoff = time.time() - older_than
        aborted = 0
        extra: dict[str, str] = {}
        while True:
            resp = await self._retry("list of multipart uploads", partial(
                s3.list_multipart_uploads, Bucket=self.bucket, Prefix=self.prefix, **extra))
            for up in resp.get("Uploads", []):
                if up["Initiated"].timestamp() < cutoff:
                    if not dry_run:
                        await self._retry(up["Key"], partial(
                            s3.abort_multipart_upload, Bucket=self.bucket, Key=up["Key"],
                            UploadId=up["UploadId"]))
                    aborted += 1
            if not resp.get("IsTruncated"):
                return aborted
            extra = {"KeyMarker": resp["NextKeyMarker"],
                     "UploadIdMarker": resp["NextUploadIdMarker"]}

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def _raise_failed(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
