"""API keys and who a request comes from.

`--api-keys FILE`: one key per line, `NAME:KEY` or `NAME:KEY:WEIGHT` (or the same separated by spaces); blank
lines and lines starting with `#` are skipped. Only SHA-256 hashes of the keys are kept, compared with
`hmac.compare_digest` against every entry; SIGHUP re-reads the file (a bad file keeps the old keys). Keys come
as `Authorization: Bearer KEY` or `X-API-Key: KEY`; the page's no-JavaScript form sends an `api_key` field.
The key's name is the client for fair batching, quotas and the access log; a key never reaches a log.

Without keys the client is the peer's address, or the address `X-Forwarded-For` names when the peer is a
trusted proxy (`--trusted-proxies`: the cluster's HAProxy on loopback).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from vqa_async.core.image_ids import scope_of, server_secret
from vqa_async.http.accesslog import PROBES
from vqa_async.http.context import CLIENT, Client
from vqa_async.http.errors import ApiError, refuse
from vqa_async.metrics import SUM_ROUTE

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MAX_WEIGHT = 64
WWW_AUTHENTICATE = 'Bearer realm="vqa-async"'


class KeyRing:
    """The keys of one file, as hashes."""

    def __init__(self, path: str, secret: bytes | None = None) -> None:
        self.path = path
        # The image ids' scopes derive from it and each key's hash (core/image_ids.py): every worker of a cluster
        # is handed the same secret, so they all give a key the same ids.
        self._secret = server_secret() if secret is None else secret
        self._stamp = _file_stamp(path)
        self._entries: list[tuple[bytes, Client]] = self._read()

    @property
    def names(self) -> list[str]:
        return sorted({c.name for _, c in self._entries})

    def find(self, key: str) -> Client | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for stored, client in self._entries:  # every entry, found or not: the time says nothing
            if hmac.compare_digest(stored, digest):
                found = client
        return found

    def reload(self) -> bool:
        stamp = _file_stamp(self.path)  # taken before reading: a write after it is seen as a change next time
        try:
            self._entries = self._read()
        except (OSError, ValueError) as e:
            log.error("API keys not reloaded, the old ones stay in force: %s", e)
            return False
        self._stamp = stamp
        log.info("API keys reloaded from %s: %d keys (%s)", self.path, len(self._entries), ", ".join(self.names))
        return True

    def reload_if_changed(self) -> None:
        """Once the SIGHUP handler is set: a worker of the cluster ignores SIGHUP until then (children.py), so a
        rotation while it was loading would otherwise be missed."""
        if _file_stamp(self.path) != self._stamp:
            self.reload()

    def _read(self) -> list[tuple[bytes, Client]]:
        entries: list[tuple[bytes, Client]] = []
        seen: dict[bytes, str] = {}
        for n, raw in enumerate(Path(self.path).read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split() if any(c.isspace() for c in line) else line.split(":")
            where = f"{self.path}:{n}"  # never the line itself: it holds a key
            if len(parts) not in (2, 3):
                raise ValueError(f"{where}: expected NAME:KEY or NAME:KEY:WEIGHT")
            name, key = parts[0], parts[1]
            if not _NAME.fullmatch(name):
                raise ValueError(f"{where}: a key's name is 1-64 letters, digits or ._@-")
            if not key:
                raise ValueError(f"{where}: the key of {name} is empty")
            weight = 1
            if len(parts) == 3:
                if not parts[2].isdigit() or not 1 <= int(parts[2]) <= MAX_WEIGHT:
                    raise ValueError(f"{where}: the weight of {name} must be a whole number 1..{MAX_WEIGHT}")
                weight = int(parts[2])
            digest = hashlib.sha256(key.encode()).digest()
            if digest in seen:
                raise ValueError(f"{where}: the key of {name} is also the key of {seen[digest]}")
            seen[digest] = name
            entries.append((digest, Client(name, weight, scope_of(self._secret, digest))))
        if not entries:
            raise ValueError(f"{self.path}: no keys (a line is NAME:KEY or NAME:KEY:WEIGHT)")
        return entries


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Auth:
    keys: KeyRing | None
    trusted: tuple[Network, ...]
    metrics_need_key: bool = False

    def is_open(self, request: web.Request) -> bool:
        """Routes that need no key: the probes, the page (its form carries the key) and its script and style (a
        browser fetches them without a key; refused, the page's script never ran), this API's description."""
        path = request.path
        if path in PROBES or path in ("/openapi.json", "/", "/static/page.js", "/static/page.css"):
            return True
        return path in ("/metrics", SUM_ROUTE) and not self.metrics_need_key


# Beside its type: form_client below reads it without importing app_keys.py (which lists it with the others).
AUTH = web.AppKey("auth", Auth)


def presented_keys(request: web.Request) -> list[str]:
    """Every credential the request carries. Each one must be valid: a bad `Authorization` next to a good
    `X-API-Key` is refused, not skipped (a client sending a wrong credential should learn of it)."""
    keys = []
    if (auth := request.headers.get(hdrs.AUTHORIZATION)) is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("use 'Authorization: Bearer KEY' (or 'X-API-Key: KEY')")
        keys.append(value.strip())
    if (header := request.headers.get("X-API-Key")) is not None:
        keys.append(header.strip())
    return keys


def unauthorized(why: str) -> ApiError:
    return refuse("unauthorized", why, {"WWW-Authenticate": WWW_AUTHENTICATE})


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """The peer's address; behind a trusted proxy, the last address in X-Forwarded-For that is not a proxy."""
    peer = request.remote or "local"
    addr = _ip(peer)
    if addr is None or not _in(addr, trusted):
        return peer
    chosen = peer
    forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, [])
    hops = [h.strip() for value in forwarded for h in value.split(",")]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:  # a garbled entry: trust nothing to its left
            break
        chosen = str(ip)
        if not _in(ip, trusted):
            break
    return chosen


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: tuple[Network, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


def form_client(request: web.Request, api_key: str | None) -> Client:
    """The client of the page's form post: its `api_key` field, or a key in a header."""
    auth = request.app[AUTH]
    if auth.keys is None:
        return request[CLIENT]
    try:
        keys = presented_keys(request)
    except ApiError:
        keys = []
    if api_key:
        keys.append(api_key)
    if not keys:
        raise unauthorized("enter your API key")
    found = {auth.keys.find(k) for k in keys}
    client = found.pop()
    if client is None or found:
        log.info("refused a form post: an unknown API key")
        raise unauthorized("that API key is not valid")
    request[CLIENT] = client
    return client
