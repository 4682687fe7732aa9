"""Image URLs (`image_url`): off by default, and when on, every way a URL can reach where it should not is refused
with its own code, before anything is fetched from there. Local aiohttp servers play the remote hosts and count
the requests they get."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from vqa_async.cli import build_parser
from vqa_async.cluster.supervisor import free_port
from vqa_async.config import Settings, settings_from_args
from vqa_async.http import media_fetch
from vqa_async.http.errors import ApiError
from vqa_async.http.media_fetch import address_problem, check_url, fetch_image

QUESTION = "what color is the shape?"


class Origin:
    """A remote image host on a loopback address: /image, /redirect/N (N hops, then the image), /to?url=U (one
    redirect to U), /slow (a body that never finishes), /endless (a body that never ends), /declared-huge (a
    Content-Length past any cap, then nothing), /missing (404). `hits` counts the requests of each path."""

    def __init__(self, image: bytes, host: str = "127.0.0.1") -> None:
        self.image = image
        self.host = host
        self.hits: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    async def start(self) -> Origin:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.hits[request.path] += 1
            return await handler(request)  # type: ignore[no-any-return]

        async def image(request: web.Request) -> web.Response:
            return web.Response(body=self.image, content_type="image/png")

        async def redirect(request: web.Request) -> web.Response:
            n = int(request.match_info["n"])
            raise web.HTTPFound(f"/redirect/{n - 1}" if n > 0 else "/image")

        async def to(request: web.Request) -> web.Response:
            raise web.HTTPFound(request.query["url"])

        async def slow(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            await resp.prepare(request)
            await resp.write(self.image[:16])
            await asyncio.sleep(60)
            return resp

        async def endless(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            await resp.prepare(request)
            chunk = b"\0" * 65536
            while True:
                await resp.write(chunk)

        async def declared_huge(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            resp.content_length = 10**9
            await resp.prepare(request)
            await asyncio.sleep(60)
            return resp

        app = web.Application(middlewares=[count])
        app.router.add_get("/image", image)
        app.router.add_get("/redirect/{n}", redirect)
        app.router.add_get("/to", to)
        app.router.add_get("/slow", slow)
        app.router.add_get("/endless", endless)
        app.router.add_get("/declared-huge", declared_huge)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture(scope="module")
def png(easy_vqa_images: list[Path]) -> bytes:
    return easy_vqa_images[0].read_bytes()


@pytest.fixture
async def origin(png: bytes) -> AsyncIterator[Origin]:
    o = await Origin(png).start()
    yield o
    await o.stop()


@pytest.fixture
async def elsewhere(png: bytes) -> AsyncIterator[Origin]:
    """A second host, on 127.0.0.2 (all of 127/8 is loopback on Linux): where a redirect must not lead."""
    o = await Origin(png, "127.0.0.2").start()
    yield o
    await o.stop()


def settings(**kw: Any) -> Settings:
    return Settings(device="cpu", **kw)


LOCAL = {"allowed_media_domains": "127.0.0.1,localhost", "allow_private_media": True}


async def refusal(url: str, s: Settings) -> str:
    with pytest.raises(ApiError) as e:
        await fetch_image(url, s)
    assert e.value.status == 400
    return e.value.code


# -- the address rules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "refused", "refused_with_private"), [
    ("8.8.8.8", False, False),
    ("2606:4700:4700::1111", False, False),
    ("127.0.0.1", True, False),
    ("127.9.9.9", True, False),
    ("::1", True, False),
    ("10.1.2.3", True, False),
    ("172.16.0.1", True, False),
    ("192.168.1.1", True, False),
    ("fc00::1", True, False),
    ("::ffff:127.0.0.1", True, False),  # IPv4-mapped: judged as the IPv4 inside
    ("::ffff:10.0.0.1", True, False),
    ("2002:7f00:1::", True, False),  # 6to4 of 127.0.0.1
    ("64:ff9b::a00:1", True, False),  # NAT64 of 10.0.0.1
    ("::ffff:8.8.8.8", False, False),
    ("169.254.169.254", True, True),  # cloud metadata: never
    ("169.254.170.2", True, True),
    ("fd00:ec2::254", True, True),
    ("::ffff:169.254.169.254", True, True),
    ("168.63.129.16", True, True),
    ("100.100.100.200", True, True),
    ("169.254.1.1", True, True),  # link-local
    ("fe80::1", True, True),
    ("224.0.0.1", True, True),  # multicast
    ("ff02::1", True, True),
    ("0.0.0.0", True, True),  # unspecified: Linux connects it to the local host
    ("0.1.2.3", True, True),
    ("::", True, True),
    ("240.0.0.1", True, True),  # reserved
    ("255.255.255.255", True, True),
    ("100.64.0.1", True, True),  # shared address space (carrier NAT): not private, not global
])
def test_address_rules(address: str, refused: bool, refused_with_private: bool) -> None:
    ip = ipaddress.ip_address(address)
    assert (address_problem(ip, allow_private=False) is not None) is refused
    assert (address_problem(ip, allow_private=True) is not None) is refused_with_private


@pytest.mark.parametrize(("url", "code"), [
    ("ftp://127.0.0.1/image", "image_url_invalid"),
    ("file:///etc/passwd", "image_url_invalid"),
    ("data:image/png;base64,AAAA", "image_url_invalid"),
    ("http://user:pw@localhost/image", "image_url_invalid"),
    ("http:///image", "image_url_invalid"),
    ("http://localhost/" + "a" * 5000, "image_url_invalid"),
    ("http://example.com/image", "image_url_not_allowed"),
    ("http://cdn.localhost/image", "image_url_not_allowed"),  # exact names: no subdomains
    ("http://127.0.0.2/image", "image_url_not_allowed"),
    ("http://169.254.169.254/latest/meta-data/", "image_url_not_allowed"),
])
def test_urls_are_checked_before_anything_is_fetched(url: str, code: str) -> None:
    with pytest.raises(ApiError) as e:
        check_url(url, settings(**LOCAL))
    assert e.value.code == code


async def test_urls_are_refused_unless_domains_are_allowed(origin: Origin) -> None:
    assert await refusal(origin.url("/image"), settings()) == "image_url_not_allowed"
    assert origin.total == 0


# -- where a URL must not lead ---------------------------------------------------------------------------------

async def test_a_loopback_target_is_refused_and_gets_no_request(origin: Origin) -> None:
    s = settings(allowed_media_domains="127.0.0.1,localhost")  # allowed names, but without --allow-private-media
    assert await refusal(origin.url("/image"), s) == "image_url_address_refused"  # a literal address
    assert await refusal(origin.url("/image", "localhost"), s) == "image_url_address_refused"  # a name
    assert await refusal(f"http://[::ffff:127.0.0.1]:{origin.port}/image",
                         settings(allowed_media_domains="::ffff:127.0.0.1")) == "image_url_address_refused"
    assert origin.total == 0


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
                                 "http://[::ffff:169.254.169.254]/", "http://0.0.0.0:80/"])
async def test_metadata_and_link_local_stay_refused_with_allow_private_media(url: str) -> None:
    s = settings(allowed_media_domains=URL(url).raw_host, allow_private_media=True)
    assert await refusal(url, s) == "image_url_address_refused"


async def test_a_host_not_allowed_is_refused(origin: Origin) -> None:
    s = settings(allowed_media_domains="localhost", allow_private_media=True)
    assert await refusal(origin.url("/image"), s) == "image_url_not_allowed"  # 127.0.0.1 is not "localhost"
    assert origin.total == 0


async def test_a_redirect_to_a_host_not_allowed_is_refused_unfetched(origin: Origin, elsewhere: Origin) -> None:
    s = settings(**LOCAL)
    assert await refusal(origin.url("/to?url=" + elsewhere.url("/image")), s) == "image_url_not_allowed"
    assert origin.hits["/to"] == 1 and elsewhere.total == 0


@pytest.fixture
def public_127_0_0_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Injects a public host: 127.0.0.2 counts as a public address, every other address keeps the real rules
    (nothing on this machine has a public address to serve from)."""
    real = media_fetch.address_problem

    def rules(ip: media_fetch.IPAddress, allow_private: bool) -> str | None:
        return None if str(ip) == "127.0.0.2" else real(ip, allow_private)

    monkeypatch.setattr(media_fetch, "address_problem", rules)


@pytest.mark.usefixtures("public_127_0_0_2")
async def test_a_redirect_from_a_public_host_to_loopback_is_refused_unfetched(origin: Origin,
                                                                              elsewhere: Origin) -> None:
    s = settings(allowed_media_domains="127.0.0.2,127.0.0.1,localhost")
    assert await fetch_image(elsewhere.url("/image"), s) == elsewhere.image  # the "public" host is fetched
    for target in (origin.url("/image"), origin.url("/image", "localhost")):
        assert await refusal(elsewhere.url("/to?url=" + target), s) == "image_url_address_refused"
    assert elsewhere.hits["/to"] == 2 and origin.total == 0


async def test_at_most_three_redirects(origin: Origin) -> None:
    s = settings(**LOCAL)
    assert await fetch_image(origin.url("/redirect/2"), s) == origin.image  # 3 redirects
    origin.hits.clear()
    assert await refusal(origin.url("/redirect/3"), s) == "image_url_too_many_redirects"
    assert origin.total == 4 and origin.hits["/image"] == 0  # the 4th redirect is not followed


# -- a remote that is slow or huge is refused, not waited for ---------------------------------------------------

async def test_a_slow_body_is_refused_at_the_timeout(origin: Origin) -> None:
    t0 = time.monotonic()
    assert await refusal(origin.url("/slow"), settings(**LOCAL, media_timeout_s=0.5)) == "image_url_timeout"
    assert time.monotonic() - t0 < 5


async def test_a_host_that_does_not_accept_is_refused_at_the_connect_timeout() -> None:
    """A listening socket whose accept queue is full: the kernel drops further SYNs, so a connect hangs."""
    listener = socket.socket()
    fillers = [socket.socket() for _ in range(3)]
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for c in fillers:
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        s = settings(**LOCAL, media_connect_timeout_s=0.5)  # the whole fetch may take 10 s
        assert await refusal(f"http://127.0.0.1:{port}/image", s) == "image_url_timeout"
        assert time.monotonic() - t0 < 3
    finally:
        for c in [listener, *fillers]:
            c.close()


async def test_an_endless_body_is_refused_at_the_byte_cap(origin: Origin) -> None:
    t0 = time.monotonic()
    assert await refusal(origin.url("/endless"), settings(**LOCAL, max_body_mb=0.5)) == "image_url_too_large"
    assert time.monotonic() - t0 < 5


async def test_a_declared_length_over_the_cap_is_refused_up_front(origin: Origin) -> None:
    t0 = time.monotonic()
    assert await refusal(origin.url("/declared-huge"), settings(**LOCAL)) == "image_url_too_large"
    assert time.monotonic() - t0 < 5  # not at the 10 s timeout: the body is never waited for


async def test_an_error_status_or_a_closed_port_is_a_fetch_failure(origin: Origin) -> None:
    s = settings(**LOCAL)
    assert await refusal(origin.url("/missing"), s) == "image_url_fetch_failed"
    assert await refusal(f"http://127.0.0.1:{free_port()}/image", s) == "image_url_fetch_failed"


async def test_an_allowed_in_house_host_is_fetched(origin: Origin) -> None:
    s = settings(**LOCAL)
    assert await fetch_image(origin.url("/image"), s) == origin.image
    assert await fetch_image(origin.url("/image", "localhost"), s) == origin.image


def test_settings_from_flags_and_environment() -> None:
    args = build_parser().parse_args(["serve", "--allowed-media-domains", "Example.com,cdn.example.com",
                                      "--allow-private-media", "--device", "cpu"])
    s = settings_from_args(args, env={})
    assert s.media_domains == {"example.com", "cdn.example.com"} and s.allow_private_media
    env = Settings.from_env({"VQA_ALLOWED_MEDIA_DOMAINS": "a.example", "VQA_MEDIA_TIMEOUT_S": "4"}, device="cpu")
    assert env.media_domains == {"a.example"} and env.media_timeout_s == 4 and not env.allow_private_media
    assert settings().media_domains == frozenset()
    for bad in ("https://example.com", "example.com:443", "*.example.com", "example.com/images"):
        with pytest.raises(ValueError, match="allowed_media_domains"):
            settings(allowed_media_domains=bad)
