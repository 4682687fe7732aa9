"""TLS at the cluster's front: HAProxy terminates it with one PEM holding the certificate chain and its key.

The pair is checked at startup (readable, PEM, the key matching the certificate), so that a wrong path or a
mismatched key is named before any worker loads a model, rather than in HAProxy's config check. The combined
file holds the private key, so it lives in the cluster's private runtime directory, mode 0600.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from vqa_async.cluster.runtime import write_atomic

PEM_NAME = "tls.pem"


def check_pair(cert: str, key: str) -> None:
    """Raises ValueError naming the file and the reason when HAProxy could not serve with this pair."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its matching private "
                         f"key ({e})") from None


def write_pem(cert: str, key: str, runtime_dir: Path) -> Path:
    """The certificate chain, then the key, in one file of the runtime directory (0600): HAProxy's `crt`."""
    parts = [Path(cert).read_text(encoding="ascii"), Path(key).read_text(encoding="ascii")]
    path = runtime_dir / PEM_NAME
    write_atomic(path, "".join(p if p.endswith("\n") else p + "\n" for p in parts))
    return path
