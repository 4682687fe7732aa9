"""Fetching an image named by URL (`image_url` on /v1/vqa, an `image_url` part in /v1/chat/completions).

Off by default: a server that fetches what a client names is a way into the network it sits in (vLLM's
CVE-2025-6242; SGLang's and TGI's fetchers have no size cap, timeout or address check). With
`--allowed-media-domains` set, a URL is fetched only when all of these hold, each refusal a 400 with its own code:

- http or https, a host and no user:password (`image_url_invalid`);
- its host is one of the allowed names, exactly: `example.com` does not allow `cdn.example.com`
  (`image_url_not_allowed`);
- every address the name resolves to is a public one: not loopback, private, link-local, multicast, reserved,
  unspecified or a cloud metadata address, IPv4 inside IPv6 (`::ffff:a.b.c.d`, 6to4, NAT64) judged as the IPv4
  it carries (`image_url_address_refused`). `--allow-private-media` allows private and loopback addresses (an
  in-house store); link-local and metadata addresses stay refused. The check is in the resolver the connection
  itself uses, so the address checked is the address connected to (no second lookup to race), and the Host header
  and TLS name stay the URL's;
- at most `MAX_REDIRECTS` redirects, each hop checked as the first (`image_url_too_many_redirects`);
- connected within `--media-connect-timeout-s` and done within `--media-timeout-s` (`image_url_timeout`);
- at most `--max-body-mb` bytes, refused as soon as Content-Length or the bytes read so far say more
  (`image_url_too_large`);
- any other failure (refused connection, TLS, a status other than 2xx, an encoded body) is
  `image_url_fetch_failed`.

Proxies from the environment are not used, cookies are not kept, nothing of the client's request is forwarded.
The bytes then take the upload's path: format allowlist, pixel cap before decoding, EXIF orientation.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from vqa_async import __version__
from vqa_async.config import Settings
from vqa_async.http.errors import ApiError, refuse

MAX_REDIRECTS = 3
MAX_URL_CHARS = 4096
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Instance metadata services that are not link-local: AWS's IPv6 one sits in fc00::/7 (private), Azure's wire
# server is a public address, Alibaba's is in the shared 100.64/10 range. 169.254.169.254 (AWS, GCP, Azure,
# Oracle, ...) and 169.254.170.2 (ECS) are link-local and named here too for the message.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "168.63.129.16", "100.100.100.200"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # Linux connects 0.x.x.x to the local host


def refused(code: str, message: str) -> ApiError:
    return refuse(code, message)


def address_problem(ip: IPAddress, allow_private: bool) -> str | None:
    """Why the server must not connect to `ip` (a few words), or None if it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or \
            (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:
            problem = address_problem(embedded, allow_private)
            return problem and f"{problem} (IPv4 {embedded} inside IPv6)"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_loopback:
        return None if allow_private else "a loopback address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return None if allow_private else "a private address"
    if not ip.is_global:
        return "an address that is not globally routable"
    return None


class AddressRefused(OSError):
    """Raised inside aiohttp's connector (which passes on OSErrors from a resolver) when a name resolves to an
    address the server must not connect to."""


class CheckingResolver(AbstractResolver):
    """The system resolver, refusing the whole name if any of its addresses is refused (a name that mixes public
    and internal addresses is not one to trust for the next lookup either). The refusal is kept for the fetcher:
    aiohttp wraps the OSError in its own connection error."""

    def __init__(self, allow_private: bool) -> None:
        self.inner = DefaultResolver()
        self.allow_private = allow_private
        self.refusal: ApiError | None = None

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for r in results:
            ip = ipaddress.ip_address(r["host"].partition("%")[0])  # a scoped IPv6 (fe80::1%eth0) is link-local
            if problem := address_problem(ip, self.allow_private):
                self.refusal = _address_refused(host, str(ip), problem)
                raise AddressRefused(f"{host} resolves to {ip}, {problem}")
        return results

    async def close(self) -> None:
        await self.inner.close()


def _address_refused(host: str, ip: str, problem: str) -> ApiError:
    hint = "" if "link-local" in problem or "metadata" in problem else \
        " (--allow-private-media allows private and loopback addresses)"
    where = f"{host}, which resolves to {ip}," if host != ip else ip
    return refused("image_url_address_refused", f"the image URL's host {where} is {problem}: not fetched{hint}")


def check_url(raw: str, settings: Settings) -> URL:
    """The URL, if it may be fetched as far as its text says; else the 400 to answer."""
    if not isinstance(raw, str) or not raw:
        raise refused("image_url_invalid", "'image_url' must be a non-empty http(s) URL")
    if len(raw) > MAX_URL_CHARS:
        raise refused("image_url_invalid", f"the image URL has {len(raw)} characters; at most {MAX_URL_CHARS}")
    try:
        url = URL(raw)
        host = url.raw_host
    except (ValueError, TypeError) as e:
        raise refused("image_url_invalid", f"the image URL cannot be read: {e}") from None
    if url.scheme not in ("http", "https"):
        what = "send the image itself as base64 instead" if url.scheme == "data" else "only http and https"
        raise refused("image_url_invalid", f"image URLs must be http or https, not {url.scheme or 'nothing'}: "
                      f"{what}")
    if not host:
        raise refused("image_url_invalid", "the image URL has no host")
    if url.raw_user is not None or url.raw_password is not None:
        raise refused("image_url_invalid", "the image URL must not carry a user name or password")
    domains = settings.media_domains
    if not domains:
        raise refused("image_url_not_allowed", "this server does not fetch image URLs (--allowed-media-domains "
                      "is not set): send the image itself")
    if host.rstrip(".").lower() not in domains:
        raise refused("image_url_not_allowed", f"the image URL's host {host} is not one this server fetches from "
                      "(--allowed-media-domains)")
    try:  # a literal address skips the resolver: check it here
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return url
    if problem := address_problem(ip, settings.allow_private_media):
        raise _address_refused(host, host, problem)
    return url


async def fetch_image(url: str, settings: Settings) -> bytes:
    """The bytes at `url`, or a 400 ApiError with a stable `image_url_*` code saying why not. Nothing is
    connected to before the URL and the address are checked."""
    target = check_url(url, settings)
    resolver = CheckingResolver(settings.allow_private_media)
    timeout = aiohttp.ClientTimeout(total=None, connect=settings.media_connect_timeout_s,
                                    sock_connect=settings.media_connect_timeout_s)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True)
    try:
        async with asyncio.timeout(settings.media_timeout_s), aiohttp.ClientSession(
                connector=connector, timeout=timeout, trust_env=False, auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={hdrs.USER_AGENT: f"vqa-async/{__version__}", hdrs.ACCEPT_ENCODING: "identity",
                         hdrs.ACCEPT: "image/*"}) as session:
            return await _follow(session, target, settings)
    except ApiError:
        raise
    except TimeoutError:  # ours, or aiohttp's connect timeout (a TimeoutError too)
        raise refused("image_url_timeout", f"the image URL did not answer in time (connect "
                      f"{settings.media_connect_timeout_s:g} s, whole fetch {settings.media_timeout_s:g} s)"
                      ) from None
    except aiohttp.InvalidURL as e:
        raise refused("image_url_invalid", f"the image URL cannot be fetched: {e}") from None
    except (aiohttp.ClientError, OSError) as e:
        if resolver.refusal is not None:
            raise resolver.refusal from None
        raise refused("image_url_fetch_failed", f"fetching the image URL failed: {type(e).__name__}: {e}") from None


async def _follow(session: aiohttp.ClientSession, url: URL, settings: Settings) -> bytes:
    """GET `url`, following redirects ourselves: each hop's URL is checked before it is connected to."""
    for hop in range(MAX_REDIRECTS + 1):
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status in _REDIRECTS:
                location = resp.headers.get(hdrs.LOCATION)
                if not location:
                    raise refused("image_url_fetch_failed", f"the image URL answered {resp.status} without a "
                                  "Location")
                if hop == MAX_REDIRECTS:
                    raise refused("image_url_too_many_redirects", f"the image URL redirected more than "
                                  f"{MAX_REDIRECTS} times")
                try:
                    url = check_url(str(url.join(URL(location))), settings)
                except ValueError as e:
                    raise refused("image_url_invalid", f"a redirect's Location cannot be read: {e}") from None
                continue
            if not 200 <= resp.status < 300:
                raise refused("image_url_fetch_failed", f"the image URL answered {resp.status} {resp.reason}")
            encoding = resp.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise refused("image_url_fetch_failed", f"the image URL sent a {encoding}-encoded body though "
                              "asked for none")
            return await _read_capped(resp, settings)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


async def _read_capped(resp: aiohttp.ClientResponse, settings: Settings) -> bytes:
    cap = settings.max_body_bytes
    too_large = f"the image at the URL is larger than {settings.max_body_mb:g} MB (--max-body-mb)"
    if resp.content_length is not None and resp.content_length > cap:
        raise refused("image_url_too_large", f"{too_large}: Content-Length {resp.content_length}")
    out = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        out += chunk
        if len(out) > cap:
            raise refused("image_url_too_large", too_large)
    return bytes(out)
