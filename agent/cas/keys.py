"""The store's keys: object names are keyed hashes, and with a store key objects are sealed.

A content hash alone would tell anyone who can list the bucket which
objects hold a known file (the template's catalog, an empty page), so
objects are named by HMAC-SHA256 of their plaintext under a naming key
that belongs to the store. Without a store key that naming key is kept in
the store's key file (names then hide content from a lister, not from a
reader of the store); with one (``JOBMESH_STORE_KEY``), the naming key and
an AES-256-GCM key are derived from it by HKDF and never stored, and the
key file holds only a salt and a check value, so a wrong key fails in one
line instead of as a corrupt object.

Key files live at ``_store/keys/<id>.json`` (``_`` starts no job id). The
first writer of a store makes one; two writers racing on an empty store may
each make their own, which costs only sharing between them: every manifest
records the id of the key its objects are named with.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..store import NotFound, Store, StoreError, get_bytes, put_bytes

KEYS_PREFIX = "_store/keys/"
STORE_KEY_ENV = "JOBMESH_STORE_KEY"
MIN_STORE_KEY = 32  # bytes of key material: HKDF does not stretch a weak passphrase
NONCE = 12
_CHECK = b"jobmesh store key check"


class KeyError_(StoreError):
    """The store key is missing, wrong, or too short: one line for the user."""


class CorruptObject(StoreError):
    """An object whose content does not match its name (or does not decrypt)."""


@dataclass(frozen=True)
class KeySet:
    """One key file's keys: names objects, and seals them when the store is encrypted."""

    id: str
    naming_key: bytes
    cipher: AESGCM | None = None

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None

    def name(self, plain: bytes | memoryview) -> str:
        return hmac.digest(self.naming_key, plain, "sha256").hex()

    def seal(self, name: str, payload: bytes) -> bytes:
        if self.cipher is None:
            return payload
        nonce = secrets.token_bytes(NONCE)
        # the name as associated data: an object copied under another name fails to open
        return nonce + self.cipher.encrypt(nonce, payload, name.encode())

    def open(self, name: str, blob: bytes) -> bytes:
        if self.cipher is None:
            return blob
        try:
            return self.cipher.decrypt(blob[:NONCE], blob[NONCE:], name.encode())
        except (InvalidTag, ValueError) as exc:
            raise CorruptObject(f"object {name[:16]}… does not decrypt with the store key "
                                "(damaged, or not this store's)") from exc


@dataclass(frozen=True)
class Keyring:
    """Every key file of a store; ``current`` names new objects."""

    current: KeySet
    by_id: dict[str, KeySet]

    def get(self, key_id: str) -> KeySet:
        try:
            return self.by_id[key_id]
        except KeyError:
            raise StoreError(f"no key file {KEYS_PREFIX}{key_id}.json in the store: it was "
                             "deleted, or the manifest is from another store") from None


def store_key_from_env() -> bytes | None:
    raw = os.environ.get(STORE_KEY_ENV, "")
    return raw.encode() if raw else None


def _derive(secret: bytes, salt: bytes, what: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                info=b"jobmesh " + what).derive(secret)


def _keyset(doc: dict[str, object], store_key: bytes | None, url: str) -> KeySet:
    kid = str(doc["id"])
    if not doc.get("encrypted"):
        return KeySet(kid, bytes.fromhex(str(doc["naming_key"])))
    if store_key is None:
        raise KeyError_(f"the store {url} is encrypted: set {STORE_KEY_ENV} to its key")
    salt = bytes.fromhex(str(doc["salt"]))
    check = hmac.digest(_derive(store_key, salt, b"check"), _CHECK, "sha256").hex()
    if not hmac.compare_digest(check, str(doc["check"])):
        raise KeyError_(f"{STORE_KEY_ENV} is not the key of the store {url} (key file {kid})")
    return KeySet(kid, _derive(store_key, salt, b"names"),
                  AESGCM(_derive(store_key, salt, b"objects")))


def _new_key_file(store_key: bytes | None) -> dict[str, object]:
    # ids sort by creation, so the oldest key file is the current one everywhere
    kid = f"{int(time.time()):010x}{secrets.token_hex(3)}"
    doc: dict[str, object] = {"format": 1, "id": kid, "encrypted": store_key is not None}
    if store_key is None:
        doc["naming_key"] = secrets.token_hex(32)
    else:
        salt = secrets.token_bytes(16)
        doc["salt"] = salt.hex()
        doc["check"] = hmac.digest(_derive(store_key, salt, b"check"), _CHECK, "sha256").hex()
    return doc


async def load_keyring(store: Store, store_key: bytes | None = None, *,
                       create: bool = True) -> Keyring:
    """The store's keys, making the first key file if there is none (and ``create``)."""
    if store_key is not None and len(store_key) < MIN_STORE_KEY:
        raise KeyError_(f"{STORE_KEY_ENV} must be at least {MIN_STORE_KEY} bytes of random key "
                        "material (e.g. `openssl rand -base64 32`)")
    docs = await _read_key_files(store)
    if not docs:
        if not create:
            raise StoreError(f"the store {store.url} has no key file ({KEYS_PREFIX}): "
                             "nothing was ever snapshotted into it")
        doc = _new_key_file(store_key)
        await put_bytes(store, f"{KEYS_PREFIX}{doc['id']}.json", json.dumps(doc).encode())
        docs = await _read_key_files(store) or [doc]
    by_id: dict[str, KeySet] = {}
    for doc in docs:
        by_id[str(doc["id"])] = _keyset(doc, store_key, store.url)
    if store_key is not None and not any(k.encrypted for k in by_id.values()):
        raise KeyError_(f"{STORE_KEY_ENV} is set but the store {store.url} is not encrypted; "
                        "unset it, or use a new store")
    # The first key file wins; a writer that raced us made the others.
    return Keyring(by_id[min(by_id)], by_id)


async def _read_key_files(store: Store) -> list[dict[str, object]]:
    out = []
    for info in await store.list(KEYS_PREFIX):
        if not info.key.endswith(".json"):
            continue
        try:
            doc = json.loads(await get_bytes(store, info.key))
        except NotFound:
            continue
        except ValueError as exc:
            raise StoreError(f"unreadable key file {info.key} in {store.url}: {exc}") from exc
        if isinstance(doc, dict) and "id" in doc:
            out.append(doc)
    return out
