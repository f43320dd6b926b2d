"""Authenticating a client at the router: SCRAM-SHA-256(-PLUS), or cleartext over TLS.

Each exchange is a tiny sans-IO object: ``start()`` gives the first
Authentication request to send; ``step(body)`` consumes one ``p`` message
body and returns what to send back and whether the exchange is over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scramp import ScramException, ScramMechanism

from . import protocol as pg
from .credentials import ScramVerifier


@dataclass(frozen=True, slots=True)
class Step:
    reply: bytes
    done: bool = False
    ok: bool = False


class ScramExchange:
    """Server side of SCRAM-SHA-256, with channel binding when TLS offers it."""

    def __init__(self, verifier: ScramVerifier, *, exists: bool, cert_pem: str | None) -> None:
        self._verifier = verifier
        # An unknown user runs the same exchange against a mock verifier and
        # always fails at the proof, like Postgres.
        self._exists = exists
        self._binding = ("tls-server-end-point", cert_pem) if cert_pem else None
        # A scramp ScramServer (scramp has no types, so to mypy it is Any).
        self._server: Any = None
        self._stage = 0

    def mechanisms(self) -> list[str]:
        if self._binding:
            return ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        return ["SCRAM-SHA-256"]

    def start(self) -> bytes:
        return pg.auth_sasl(self.mechanisms())

    def step(self, body: bytes) -> Step:
        try:
            if self._stage == 0:
                return self._client_first(body)
            if self._stage == 1:
                return self._client_final(body)
        except ScramException:
            return Step(b"", done=True, ok=False)
        raise pg.ProtocolViolation("unexpected SASL message after the exchange ended")

    def _client_first(self, body: bytes) -> Step:
        mechanism, data = pg.decode_sasl_initial_response(body)
        if mechanism not in self.mechanisms():
            raise pg.ProtocolViolation(f"client selected an invalid SASL mechanism {mechanism!r}")
        # Over TLS the binding is given to scramp even for plain SCRAM-SHA-256,
        # so a client-first flagged "y" (client could bind but believes the
        # server cannot) is rejected: that is a downgrade attack (RFC 5802).
        binding = self._binding
        auth_info = self._verifier.as_auth_info()
        self._server = ScramMechanism(mechanism).make_server(
            lambda _username: auth_info, channel_binding=binding
        )
        text = _text(data)
        header, bare = _split_gs2_header(text)
        if bare.startswith("n=,"):
            # libpq sends an empty SCRAM username (Postgres uses the startup
            # packet's); scramp rejects empty attributes. Parse with a
            # placeholder, then restore the exact bare message the client
            # signed, which scramp keeps for the AuthMessage of the proof.
            self._server.set_client_first(header + "n=*" + bare[2:])
            self._server.client_first_bare = bare
        else:
            self._server.set_client_first(text)
        self._stage = 1
        return Step(pg.auth_sasl_continue(self._server.get_server_first().encode()))

    def _client_final(self, body: bytes) -> Step:
        assert self._server is not None
        self._server.set_client_final(_text(body))
        self._stage = 2
        if not self._exists:
            return Step(b"", done=True, ok=False)
        final = self._server.get_server_final().encode()
        return Step(pg.auth_sasl_final(final), done=True, ok=True)


class CleartextExchange:
    """AuthenticationCleartextPassword; the router offers it only over TLS."""

    def __init__(self, verifier: ScramVerifier, *, exists: bool) -> None:
        self._verifier = verifier
        self._exists = exists

    def start(self) -> bytes:
        return pg.auth_cleartext()

    def step(self, body: bytes) -> Step:
        password = pg.decode_password(body)
        try:
            ok = self._exists and self._verifier.matches(password)
        except ScramException:  # e.g. a password SASLprep refuses
            ok = False
        return Step(b"", done=True, ok=ok)


Exchange = ScramExchange | CleartextExchange


def _split_gs2_header(text: str) -> tuple[str, str]:
    first = text.find(",")
    second = text.find(",", first + 1) if first >= 0 else -1
    if second < 0:
        raise pg.ProtocolViolation("malformed SCRAM client-first-message")
    return text[: second + 1], text[second + 1 :]


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise pg.ProtocolViolation("SASL message is not valid UTF-8") from exc
