"""The object stores, against a real directory and a real S3 API (moto server)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobmesh.agent.store import NotFound, StoreError, get_bytes, open_store, put_bytes
from jobmesh.agent.store.counting import CountingStore
from jobmesh.agent.store.s3 import PART_SIZE, S3Store
from tests.support.fault_proxy import FaultProxy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.create_bucket(f"store-{os.urandom(4).hex()}")
    return f"s3://{bucket}/some/prefix"


async def _chunks(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _run(coro):
    return asyncio.run(coro)


def test_put_then_get_returns_identical_bytes_and_digest(store_url):
    data = os.urandom(PART_SIZE * 2 + 12345)  # several multipart parts on S3

    async def go():
        store = open_store(store_url)
        try:
            stored = await store.put("job1/snapshots/a/data.tar.zst", _chunks(data))
            assert stored.size == len(data)
            assert stored.sha256 == hashlib.sha256(data).hexdigest()
            assert await get_bytes(store, "job1/snapshots/a/data.tar.zst") == data
            assert await store.size("job1/snapshots/a/data.tar.zst") == len(data)
        finally:
            await store.close()

    _run(go())


def test_list_is_scoped_to_the_prefix_and_sorted(store_url):
    async def go():
        store = open_store(store_url)
        try:
            for key in ["j/b", "j/a/x", "k/a", "j2/a"]:
                await put_bytes(store, key, key.encode())
            assert [o.key for o in await store.list("j/")] == ["j/a/x", "j/b"]
            await store.delete("j/b")
            assert [o.key for o in await store.list("j/")] == ["j/a/x"]
        finally:
            await store.close()

    _run(go())


def test_put_new_adds_an_object_once_and_never_replaces_it(store_url):
    async def go():
        store = CountingStore(open_store(store_url))
        try:
            assert await store.put_new("_objects/ab/one", b"first") is True
            assert await store.put_new("_objects/ab/one", b"second") is False
            assert await get_bytes(store, "_objects/ab/one") == b"first"
            assert [o.key for o in await store.list("_objects/")] == ["_objects/ab/one"]
            assert store.requests["put"] == 2
        finally:
            await store.close()

    _run(go())


def test_put_new_on_an_s3_api_without_conditional_writes_looks_then_writes(s3_server, caplog):
    bucket = s3_server.create_bucket(f"store-{os.urandom(4).hex()}")
    with FaultProxy(s3_server.endpoint, rate=0, unsupported=("if-none-match",)) as proxy:
        async def go():
            store = S3Store(bucket, "p", endpoint=proxy.endpoint)
            try:
                assert await store.put_new("_objects/ab/one", b"first") is True
                assert await store.put_new("_objects/ab/one", b"second") is False
                assert await store.put_new("_objects/ab/two", b"two") is True
                assert await get_bytes(store, "_objects/ab/one") == b"first"
            finally:
                await store.close()

        with caplog.at_level(logging.WARNING, logger="jobmesh.agent.store"):
            _run(go())
        assert proxy.counts["501"] == 1  # asked once, then remembered
    assert [r.getMessage() for r in caplog.records] == [
        f"s3://{bucket}/p does not implement conditional writes (If-None-Match): shared "
        "objects are checked, then written"]


def test_missing_object_is_not_found(store_url):
    async def go():
        store = open_store(store_url)
        try:
            assert await store.size("nope/x") is None
            with pytest.raises(NotFound):
                await get_bytes(store, "nope/x")
        finally:
            await store.close()

    _run(go())


class Boom(Exception):
    pass


def test_an_upload_that_fails_midway_leaves_no_object(store_url, s3_server):
    async def failing() -> AsyncIterator[bytes]:
        yield os.urandom(PART_SIZE)
        yield os.urandom(PART_SIZE)
        raise Boom

    async def go():
        store = open_store(store_url)
        try:
            with pytest.raises(Boom):
                await store.put("j/snapshots/s/data.tar.zst", failing())
            assert await store.list("j/") == []
        finally:
            await store.close()

    _run(go())
    if store_url.startswith("s3://"):
        import boto3

        bucket = store_url.split("/")[2]
        s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_file_store_hides_uploads_in_progress(tmp_path):
    async def go():
        store = open_store(f"file://{tmp_path}")
        gate, first_written = asyncio.Event(), asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield b"x" * 10
            first_written.set()  # the store asks for more only after writing the first chunk
            await gate.wait()
            yield b"y"

        task = asyncio.create_task(store.put("j/obj", slow()))
        await first_written.wait()
        assert any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))
        assert await store.list("j/") == []
        gate.set()
        await task
        assert [o.key for o in await store.list("j/")] == ["j/obj"]

    _run(go())


@pytest.mark.parametrize("url", ["ftp://x/y", "file://relative/path", "s3:///nobucket", "nope"])
def test_bad_store_url_is_one_clear_error(url):
    with pytest.raises(StoreError, match="bad store URL"):
        open_store(url)


def test_file_store_refuses_keys_that_escape_its_root(tmp_path):
    async def go():
        store = open_store(f"file://{tmp_path}")
        with pytest.raises(StoreError, match="invalid object key"):
            await put_bytes(store, "../escape", b"x")

    _run(go())


def test_missing_bucket_is_one_clear_error(s3_server):
    async def go():
        store = open_store("s3://no-such-bucket-here/p")
        try:
            with pytest.raises(StoreError, match="does not exist"):
                await put_bytes(store, "k", b"x")
        finally:
            await store.close()

    _run(go())
