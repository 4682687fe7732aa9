"""Image URLs through a real `vqa-async serve`: answered as the upload is, in a chat completion too, under the
pixel cap, and while a fetch hangs. The fetcher's own rules are in test_media_fetch.py."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

# origin, elsewhere and png are fixtures (the remote hosts and their picture), shared with test_media_fetch.py
from test_media_fetch import QUESTION, Origin, elsewhere, origin, png  # noqa: F401, F811

from vqa_async.testing.launch import start_serve

# -- through a real `vqa-async serve` ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve(demo_dir: Path) -> Iterator[str]:
    srv = start_serve(demo_dir, "--allowed-media-domains", "127.0.0.1,localhost", "--allow-private-media",
                      "--media-timeout-s", "1", "--max-pixels", "10000", env={"VQA_DEVICE": "cpu"})
    try:
        yield srv.url
    finally:
        srv.stop()


async def _ask(s: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, dict[str, Any]]:
    async with s.post(url + "/v1/vqa", json={"question": QUESTION, **body}) as r:
        return r.status, await r.json()


async def test_serve_answers_an_image_url_as_it_answers_the_upload(serve: str, origin: Origin,
                                                                   elsewhere: Origin) -> None:
    async with aiohttp.ClientSession() as s:
        status, uploaded = await _ask(s, serve, image=base64.b64encode(origin.image).decode())
        assert status == 200
        status, fetched = await _ask(s, serve, image_url=origin.url("/image"))
        assert status == 200 and fetched["answer"] == uploaded["answer"]
        assert origin.hits["/image"] == 1

        status, body = await _ask(s, serve, image_url=elsewhere.url("/image"))
        assert (status, body["error"]["code"]) == (400, "image_url_not_allowed")
        status, body = await _ask(s, serve, image_url=origin.url("/to?url=" + elsewhere.url("/image")))
        assert (status, body["error"]["code"]) == (400, "image_url_not_allowed")
        assert elsewhere.total == 0
        status, body = await _ask(s, serve, image_url=origin.url("/image"), image="AAAA")
        assert (status, body["error"]["code"]) == (400, "invalid_field")


async def test_serve_fetches_an_image_url_part_of_a_chat_completion(serve: str, origin: Origin,
                                                                     elsewhere: Origin) -> None:
    def chat(url: str) -> dict[str, Any]:
        return {"model": "demo", "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}

    async with aiohttp.ClientSession() as s:
        status, uploaded = await _ask(s, serve, image=base64.b64encode(origin.image).decode())
        async with s.post(serve + "/v1/chat/completions", json=chat(origin.url("/image"))) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"] == uploaded["answer"]
        async with s.post(serve + "/v1/chat/completions", json=chat(elsewhere.url("/image"))) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "image_url_not_allowed")
    assert origin.hits["/image"] == 1 and elsewhere.total == 0


async def test_serve_applies_the_pixel_cap_to_a_fetched_image(serve: str, origin: Origin) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, "PNG")  # 40,000 pixels; the server allows 10,000
    origin.image = buf.getvalue()
    async with aiohttp.ClientSession() as s:
        status, body = await _ask(s, serve, image_url=origin.url("/image"))
    assert (status, body["error"]["code"]) == (413, "image_too_large")


async def test_serve_keeps_answering_while_a_fetch_hangs(serve: str, origin: Origin) -> None:
    """The fetch is asynchronous: a remote that never finishes its body holds one request, not the process."""
    async with aiohttp.ClientSession() as s:
        hanging = asyncio.create_task(_ask(s, serve, image_url=origin.url("/slow")))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        async with s.get(serve + "/healthz") as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 0.5
        status, body = await hanging
    assert (status, body["error"]["code"]) == (400, "image_url_timeout")
