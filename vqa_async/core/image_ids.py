"""Image ids that name an image for the client that sent it, and no one else.

Without API keys an image's id is the SHA-256 of its bytes, as it always was: anyone holding the same bytes may
ask about it by that id. With keys, each key's client has its own scope, a secret derived from

    scope = HMAC-SHA256(server secret, "vqa-async image scope" || SHA-256(the key))

and an image's id is HMAC-SHA256(scope, SHA-256(the bytes)): the same image has an unrelated id for each key, and
no id says which bytes it names. The embedding cache keys an entry by the id *and* the scope that made it
(`cache_key`), so a follow-up that sends another key's id finds nothing and gets 409 image_not_cached, even if that
id leaked. Two keys uploading the same picture do not share a vision pass: a shared entry would make the second
upload faster (compute_ms, Server-Timing), which tells its sender that someone else sent that picture recently.

The server secret comes from `VQA_IMAGE_ID_SECRET` (any text); `vqa-async cluster` draws one at start and hands it
to its workers, so that every worker, restarted or reloaded, agrees on the ids and HAProxy's stick table can send
a follow-up to the worker holding its image. A lone `serve` without it draws its own (ids then change across
restarts, as its cache does). Workers on other hosts (`--backend`) need the same `VQA_IMAGE_ID_SECRET` as their front.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

SECRET_ENV = "VQA_IMAGE_ID_SECRET"
_SCOPE_LABEL = b"vqa-async image scope\0"


def server_secret() -> bytes:
    """The secret the scopes derive from: the environment's, or a fresh one for this process."""
    given = os.environ.get(SECRET_ENV)
    return given.encode() if given else secrets.token_bytes(32)


def scope_of(secret: bytes, key_digest: bytes) -> bytes:
    """The scope of the client holding the key whose SHA-256 is `key_digest`."""
    return hmac.new(secret, _SCOPE_LABEL + key_digest, hashlib.sha256).digest()


def image_id(content: bytes, scope: bytes = b"") -> str:
    """The id of an image (its bytes) for a client's `scope` (empty: no keys, the bare SHA-256)."""
    digest = hashlib.sha256(content)
    if not scope:
        return digest.hexdigest()
    return hmac.new(scope, digest.digest(), hashlib.sha256).hexdigest()


def cache_key(image_id: str, scope: bytes = b"") -> str:
    """Where the embedding of `image_id` sits in the cache for the client of `scope`: the id alone without keys;
    with keys, the id bound to its scope, so that only the client who uploaded it finds it."""
    if not scope:
        return image_id
    return f"{image_id}/{hashlib.sha256(scope).hexdigest()[:32]}"
