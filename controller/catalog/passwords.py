"""Passwords become SCRAM-SHA-256 verifiers before they reach the catalog."""

from __future__ import annotations

import base64

from scramp import ScramMechanism

ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def scram_verifier(password: str, iterations: int = ITERATIONS) -> str:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``, as PostgreSQL stores it."""
    salt, stored_key, server_key, iters = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations)
    b64 = base64.b64encode
    return (f"SCRAM-SHA-256${iters}:{b64(salt).decode()}"
            f"${b64(stored_key).decode()}:{b64(server_key).decode()}")
