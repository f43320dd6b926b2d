"""The router's server-side TLS context."""

from __future__ import annotations

import ssl
from pathlib import Path


class TLSConfigError(ValueError):
    pass


def server_context(cert_file: str, key_file: str) -> tuple[ssl.SSLContext, str]:
    """An SSLContext for clients, and the certificate PEM (for SCRAM channel binding)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
        cert_pem = Path(cert_file).read_text("ascii")
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        raise TLSConfigError(f"cannot load TLS key pair {cert_file}, {key_file}: {exc}") from exc
    return ctx, cert_pem
