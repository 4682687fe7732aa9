"""A throwaway self-signed certificate for loopback TLS (the tests and `python -m bench tls`): openssl, as the README's
TLS recipe does it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_cert(where: Path, name: str = "localhost", days: int = 2) -> tuple[Path, Path]:
    """Writes where/cert.pem and where/key.pem, valid for localhost and 127.0.0.1; returns (cert, key)."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days), "-subj",
                    f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
