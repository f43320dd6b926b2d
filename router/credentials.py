"""Password verifiers as Postgres stores them, and checking a password against one.

A route file may hold a user's password as plain text or as the verifier
Postgres keeps in ``pg_authid.rolpassword``::

    SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>

Plain text is turned into a verifier once, at load time, so the router never
keeps a usable password for clients in memory. The SCRAM maths is scramp's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from scramp import ScramMechanism

_SHA256 = ScramMechanism("SCRAM-SHA-256")
_PREFIX = "SCRAM-SHA-256$"


class InvalidVerifier(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def as_auth_info(self) -> tuple[bytes, bytes, bytes, int]:
        """The tuple scramp's server ``auth_fn`` returns."""
        return self.salt, self.stored_key, self.server_key, self.iterations

    def matches(self, password: str) -> bool:
        """Check a cleartext password (only ever received over TLS)."""
        _, stored_key, _, _ = _SHA256.make_auth_info(
            password, iteration_count=self.iterations, salt=self.salt
        )
        return hmac.compare_digest(stored_key, self.stored_key)

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (
            f"{_PREFIX}{self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )


def is_verifier(text: str) -> bool:
    return text.startswith(_PREFIX)


def make_verifier(password: str, iterations: int = 4096) -> ScramVerifier:
    salt, stored_key, server_key, iterations = _SHA256.make_auth_info(
        password, iteration_count=iterations
    )
    return ScramVerifier(salt, stored_key, server_key, iterations)


def parse_verifier(text: str) -> ScramVerifier:
    try:
        scheme, params, keys = text.split("$")
        iterations_s, salt_s = params.split(":")
        stored_s, server_s = keys.split(":")
        if scheme != "SCRAM-SHA-256":
            raise InvalidVerifier(f"unsupported scheme {scheme!r}")
        iterations = int(iterations_s)
        salt = base64.b64decode(salt_s, validate=True)
        stored_key = base64.b64decode(stored_s, validate=True)
        server_key = base64.b64decode(server_s, validate=True)
    except (ValueError, binascii.Error) as exc:
        if isinstance(exc, InvalidVerifier):
            raise
        raise InvalidVerifier("not a SCRAM-SHA-256 verifier") from exc
    keys_ok = len(stored_key) == 32 and len(server_key) == 32
    if not 4096 <= iterations <= 10_000_000 or not keys_ok or not salt:
        raise InvalidVerifier("SCRAM-SHA-256 verifier has out-of-range fields")
    return ScramVerifier(salt, stored_key, server_key, iterations)


def credential_from_config(password: str) -> ScramVerifier:
    return parse_verifier(password) if is_verifier(password) else make_verifier(password)


class MockVerifiers:
    """Stable fake verifiers for users that do not exist.

    Postgres runs a full SCRAM exchange with a made-up salt for unknown roles
    so that a client cannot tell "no such user" from "wrong password". The
    salt is derived from the name with a per-process key, so repeated tries
    see the same salt, as they would for a real user.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._keys = secrets.token_bytes(32)

    def for_user(self, user: str) -> ScramVerifier:
        salt = hmac.new(self._key, user.encode(), hashlib.sha256).digest()[:16]
        return ScramVerifier(salt, self._keys, self._keys, 4096)
