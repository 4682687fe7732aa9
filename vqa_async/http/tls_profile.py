"""Mozilla's "intermediate" TLS profile (Server Side TLS guideline 5.7, https://ssl-config.mozilla.org), for both
places where vqa-async terminates TLS: `serve --tls-cert` (server.py) and the cluster's HAProxy (haproxy.cfg.j2).
TLS 1.2 and 1.3 only; on TLS 1.2 only forward-secret key exchange (ECDHE, DHE) with AEAD ciphers (AES-GCM,
ChaCha20-Poly1305): no static-RSA key exchange, no CBC. No session tickets: their key would outlive the
connections it protects and undo forward secrecy. The client's cipher preference is honoured, as the profile says
(every cipher on the list is strong)."""

from __future__ import annotations

import ssl

MIN_VERSION = "TLSv1.2"
CIPHERS = ":".join([  # TLS 1.2 (OpenSSL names)
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"])
CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"  # TLS 1.3


def server_context(cert: str, key: str, alpn: list[str]) -> ssl.SSLContext:
    """An SSLContext with the profile. Python's ssl cannot set the TLS 1.3 suites, but OpenSSL's default is the
    profile's three; it has no built-in DH group either, so the DHE suites stay off here (every client the
    profile serves also speaks ECDHE; HAProxy offers them with RFC 7919's ffdhe2048)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_TICKET
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(alpn)
    return ctx
