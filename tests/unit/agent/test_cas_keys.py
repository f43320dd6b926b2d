"""Object names and sealing (agent/cas/keys.py, objects.py): keyed names, AES-GCM, tamper checks.

The store is a file:// directory under pytest's tmp_path (no sockets); every
behaviour is checked on what actually lands in it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from jobmesh.agent.cas import keyring_for
from jobmesh.agent.cas.keys import (
    MIN_STORE_KEY,
    STORE_KEY_ENV,
    CorruptObject,
    KeyError_,
    load_keyring,
)
from jobmesh.agent.cas.objects import OBJECTS_PREFIX, Objects, name_of_key, object_key
from jobmesh.agent.store import Store, get_bytes, put_bytes
from jobmesh.agent.store.file import FileStore

pytestmark = pytest.mark.timeout(30)

STORE_KEY = "k" * 16 + os.urandom(16).hex()  # 48 bytes
# incompressible: zstd stores it as a raw block, so an unsealed object holds it verbatim
PLAIN = os.urandom(8192)


def new_store(tmp_path: Path, name: str = "store") -> Store:
    root = tmp_path / name
    root.mkdir()
    return FileStore(str(root))


async def objects_of(store: Store) -> Objects:
    return Objects(store, (await keyring_for(store)).current)


def windows(hexdigest: str, width: int = 16) -> list[str]:
    return [hexdigest[i:i + width] for i in range(len(hexdigest) - width + 1)]


async def stored_blob(store: Store, name: str) -> bytes:
    return await get_bytes(store, object_key(name))


@pytest.fixture
def no_store_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_KEY_ENV, raising=False)


@pytest.fixture
def store_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(STORE_KEY_ENV, STORE_KEY)
    return STORE_KEY


# --- names --------------------------------------------------------------------------------


async def test_an_object_name_is_not_the_sha256_of_its_content(tmp_path: Path,
                                                               no_store_key: None) -> None:
    store = new_store(tmp_path)
    objects = await objects_of(store)
    name = objects.name(PLAIN)
    plain_hash = hashlib.sha256(PLAIN).hexdigest()
    assert len(name) == 64 and name != plain_hash
    await objects.put(objects.encode(PLAIN))
    keys = [info.key for info in await store.list("")]
    assert object_key(name) in keys
    for key in keys:
        assert not any(w in key for w in windows(plain_hash)), key


async def test_two_stores_name_the_same_content_differently(tmp_path: Path,
                                                            no_store_key: None) -> None:
    one = await objects_of(new_store(tmp_path, "one"))
    two = await objects_of(new_store(tmp_path, "two"))
    assert one.name(PLAIN) != two.name(PLAIN)


async def test_a_store_names_content_the_same_way_every_time(tmp_path: Path,
                                                             no_store_key: None) -> None:
    store = new_store(tmp_path)
    first = await objects_of(store)
    again = await objects_of(store)  # read back from the key file written the first time
    assert first.keys.id == again.keys.id
    assert first.name(PLAIN) == again.name(PLAIN)
    assert [i.key for i in await store.list("_store/keys/")] == [
        f"_store/keys/{first.keys.id}.json"]


def test_only_object_keys_have_an_object_name() -> None:
    name = "ab" + "0" * 62
    assert name_of_key(object_key(name)) == name
    assert object_key(name) == f"{OBJECTS_PREFIX}ab/{name}"
    assert name_of_key(f"{OBJECTS_PREFIX}cd/{name}") is None  # filed under the wrong prefix
    assert name_of_key("job/snapshots/x/manifest.json") is None


# --- sealing ------------------------------------------------------------------------------


async def test_without_a_store_key_objects_are_only_compressed(tmp_path: Path,
                                                               no_store_key: None) -> None:
    store = new_store(tmp_path)
    objects = await objects_of(store)
    assert not objects.keys.encrypted
    encoded = objects.encode(PLAIN)
    await objects.put(encoded)
    # the control for the test below: an unsealed object shows its plaintext
    assert PLAIN in await stored_blob(store, encoded.name)


async def test_with_a_store_key_objects_are_encrypted_and_decode_back(tmp_path: Path,
                                                                      store_key: str) -> None:
    store = new_store(tmp_path)
    objects = await objects_of(store)
    assert objects.keys.encrypted
    encoded = objects.encode(PLAIN)
    await objects.put(encoded)
    blob = await stored_blob(store, encoded.name)
    assert PLAIN not in blob and PLAIN[:64] not in blob
    assert await objects.get(encoded.name) == PLAIN
    # and the key file holds nothing that names or opens objects without the key
    [key_file] = [i.key for i in await store.list("_store/keys/")]
    doc = (await get_bytes(store, key_file)).decode()
    assert STORE_KEY not in doc and "naming_key" not in doc


async def test_the_same_store_key_opens_the_store_again(tmp_path: Path, store_key: str) -> None:
    store = new_store(tmp_path)
    objects = await objects_of(store)
    encoded = objects.encode(PLAIN)
    await objects.put(encoded)
    again = await objects_of(store)
    assert again.name(PLAIN) == encoded.name
    assert await again.get(encoded.name) == PLAIN


async def test_a_wrong_store_key_fails_in_one_line_naming_the_variable(
        tmp_path: Path, store_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path)
    await objects_of(store)
    monkeypatch.setenv(STORE_KEY_ENV, "w" * 16 + os.urandom(16).hex())
    with pytest.raises(KeyError_) as caught:
        await keyring_for(store)
    message = str(caught.value)
    assert STORE_KEY_ENV in message and "\n" not in message


async def test_a_short_store_key_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORE_KEY_ENV, "x" * (MIN_STORE_KEY - 1))
    store = new_store(tmp_path)
    with pytest.raises(KeyError_, match=STORE_KEY_ENV) as caught:
        await keyring_for(store)
    assert "\n" not in str(caught.value)
    assert await store.list("") == []  # refused before anything was written


async def test_an_encrypted_store_without_the_key_is_refused(
        tmp_path: Path, store_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path)
    await objects_of(store)
    monkeypatch.delenv(STORE_KEY_ENV)
    with pytest.raises(KeyError_, match=STORE_KEY_ENV) as caught:
        await keyring_for(store)
    assert "\n" not in str(caught.value)
    with pytest.raises(KeyError_, match=STORE_KEY_ENV):
        await load_keyring(store, None, create=False)


async def test_a_store_key_for_an_unencrypted_store_is_refused(
        tmp_path: Path, no_store_key: None, monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path)
    await objects_of(store)
    monkeypatch.setenv(STORE_KEY_ENV, STORE_KEY)
    with pytest.raises(KeyError_, match=STORE_KEY_ENV):
        await keyring_for(store)


# --- tampering ----------------------------------------------------------------------------


@pytest.fixture(params=["plain", "encrypted"])
def sealing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "encrypted":
        monkeypatch.setenv(STORE_KEY_ENV, STORE_KEY)
    else:
        monkeypatch.delenv(STORE_KEY_ENV, raising=False)
    return str(request.param)


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
async def test_a_flipped_byte_in_a_stored_object_raises_corrupt_object(
        tmp_path: Path, sealing: str, where: float) -> None:
    store = new_store(tmp_path)
    objects = await objects_of(store)
    encoded = objects.encode(PLAIN)
    await objects.put(encoded)
    blob = bytearray(await stored_blob(store, encoded.name))
    blob[int(len(blob) * where)] ^= 0x01
    await put_bytes(store, object_key(encoded.name), bytes(blob))
    with pytest.raises(CorruptObject):
        await objects.get(encoded.name)


async def test_an_object_stored_under_another_name_raises_corrupt_object(
        tmp_path: Path, sealing: str) -> None:
    store = new_store(tmp_path)
    objects = await objects_of(store)
    encoded = objects.encode(PLAIN)
    other = objects.encode(PLAIN[::-1])
    await objects.put(encoded)
    await put_bytes(store, object_key(other.name), encoded.blob)
    with pytest.raises(CorruptObject):
        await objects.get(other.name)
    assert await objects.get(encoded.name) == PLAIN
