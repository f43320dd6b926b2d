"""Passwords become SCRAM-SHA-256 verifiers before they reach the catalog."""

from __future__ import annotations

import base64
import hmac

from scramp import ScramMechanism

ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def scram_verifier(password: str, iterations: int = ITERATIONS) -> str:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``, as PostgreSQL stores it."""
    salt, stored_key, server_key, iters = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations)
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${iters}:{b64(salt).decode()}"
            f"${b64(stored_key).decode()}:{b64(server_key).decode()}")


def password_matches(password: str, verifier: str) -> bool:
    """Whether ``password`` is the one ``verifier`` was made from (the StoredKey compared
    in constant time). False, too, for a verifier this cannot read."""
    try:
        scheme, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        stored_key = base64.b64decode(keys.split(":", 1)[0], validate=True)
        salt_bytes = base64.b64decode(salt, validate=True)
        count = int(iterations)
    except ValueError:
        return False
    if scheme != "SCRAM-SHA-256" or not 1 <= count <= 10_000_000:
        return False
    _salt, computed, _server, _iters = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=count, salt=salt_bytes)
    return hmac.compare_digest(computed, stored_key)
