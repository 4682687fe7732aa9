"""Follow-up questions by `image_id`, through the real app and the demo model: every answer names its image; a
follow-up that names it is answered from the embedding cache without decoding anything, or gets 409
image_not_cached (also when the entry is evicted between admission and the model call: that request alone)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from fakes import FaultyAnswerer

from vqa_async.batching.work import WorkItem
from vqa_async.core.adapter import ImageNotCached, VqaPayload
from vqa_async.http.app_keys import METRICS, SERVICE
from vqa_async.model.preprocess import UploadPixels

ClientMaker = Callable[..., Awaitable[TestClient[Any, Any]]]
QUESTION = "what color is the shape?"


def form(image: bytes | None = None, image_id: str | None = None, question: str = QUESTION,
         multipart: bool = True) -> FormData:
    f = FormData(default_to_multipart=multipart)
    if image is not None:
        f.add_field("image", image, filename="x.png", content_type="image/png")
    if image_id is not None:
        f.add_field("image_id", image_id)
    f.add_field("question", question)
    return f


def app_of(client: TestClient[Any, Any]) -> web.Application:
    app = client.server.app
    assert app is not None
    return app


def metric(client: TestClient[Any, Any], name: str, labels: dict[str, str] | None = None) -> float:
    return app_of(client)[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


async def test_every_way_of_naming_the_image_is_answered_from_the_cache(make_client: ClientMaker,
                                                                         easy_vqa_images: list[Path]) -> None:
    client = await make_client()
    image = easy_vqa_images[0].read_bytes()
    first = await client.post("/v1/vqa", data=form(image, question="what is the shape?"))
    assert first.status == 200, await first.text()
    image_id = (await first.json())["image_id"]
    assert image_id == hashlib.sha256(image).hexdigest() == first.headers["X-Image-Id"]
    expected = (await (await client.post("/v1/vqa", data=form(image))).json())["answer"]
    hits, misses = metric(client, "vqa_image_cache_hits_total"), metric(client, "vqa_image_cache_misses_total")
    decodes = metric(client, "vqa_stage_seconds_total", {"stage": "decode"})

    follow_ups = [
        client.post("/v1/vqa", data=form(image_id=image_id)),  # a form field
        client.post("/v1/vqa", data=form(image_id=image_id, multipart=False)),  # a form without a file (curl -d)
        client.post("/v1/vqa", json={"image_id": image_id, "question": QUESTION}),  # a JSON key
        client.post("/v1/vqa", data=form(), headers={"X-Image-Id": image_id}),  # the header (for proxies)
        client.post(f"/v1/vqa?image_id={image_id.upper()}", json={"question": QUESTION}),  # the query parameter
    ]
    for req in follow_ups:  # one at a time: each is its own model call, so each counts a hit
        resp = await req
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["answer"] == expected and body["image_id"] == image_id == resp.headers["X-Image-Id"]
    assert metric(client, "vqa_image_cache_hits_total") == hits + len(follow_ups)
    assert metric(client, "vqa_image_cache_misses_total") == misses
    assert metric(client, "vqa_stage_seconds_total", {"stage": "decode"}) == decodes  # nothing decoded

    legacy = await client.post("/vqa", data=form(image_id=image_id))
    assert legacy.status == 200 and legacy.headers["X-Image-Id"] == image_id
    assert (await legacy.json())["answer"] == expected


async def test_an_image_not_cached_is_409_and_asks_for_the_image(make_client: ClientMaker) -> None:
    client = await make_client()
    unknown = "ab" * 32
    resp = await client.post("/v1/vqa", data=form(image_id=unknown))
    assert resp.status == 409
    err = (await resp.json())["error"]
    assert err["code"] == "image_not_cached" and "send the image again" in err["message"]
    assert "X-Image-Id" not in resp.headers
    legacy = await client.post("/vqa", json={"image_id": unknown, "question": QUESTION})
    assert legacy.status == 409 and (await legacy.json())["code"] == "image_not_cached"


@pytest.mark.parametrize("name, kwargs, code", [
    ("short", {"data": lambda img: form(image_id="abc123")}, "invalid_image_id"),
    ("not hex", {"data": lambda img: form(image_id="z" * 64)}, "invalid_image_id"),
    ("json number", {"json": lambda img: {"image_id": 7, "question": QUESTION}}, "invalid_image_id"),
    ("both in a form", {"data": lambda img: form(img, "ab" * 32)}, "image_and_image_id"),
    ("both in JSON", {"json": lambda img: {"image": "aGk=", "image_id": "ab" * 32, "question": QUESTION}},
     "image_and_image_id"),
    ("image and the header", {"data": lambda img: form(img), "headers": {"X-Image-Id": "ab" * 32}},
     "image_and_image_id"),
    ("two different ids", {"data": lambda img: form(image_id="ab" * 32), "headers": {"X-Image-Id": "cd" * 32}},
     "invalid_image_id"),
])
async def test_a_bad_image_id_is_a_clear_400(make_client: ClientMaker, easy_vqa_images: list[Path], name: str,
                                             kwargs: dict[str, Any], code: str) -> None:
    client = await make_client()
    img = easy_vqa_images[0].read_bytes()
    resp = await client.post("/v1/vqa", **{k: v(img) if callable(v) else v for k, v in kwargs.items()})
    assert resp.status == 400, name
    assert (await resp.json())["error"]["code"] == code, name


async def test_a_file_part_named_image_id_is_400(make_client: ClientMaker) -> None:
    client = await make_client()
    f = FormData()
    f.add_field("image_id", b"ab" * 32, filename="id.txt")
    f.add_field("question", QUESTION)
    resp = await client.post("/v1/vqa", data=f)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_image_id"


async def test_evicted_after_admission_fails_that_request_alone_with_409(make_client: ClientMaker,
                                                                         easy_vqa_images: list[Path]) -> None:
    client = await make_client(max_wait_ms=5)
    service = app_of(client)[SERVICE]
    image = easy_vqa_images[0].read_bytes()
    image_id = (await (await client.post("/v1/vqa", data=form(image))).json())["image_id"]
    assert service.runner.adapter.answerer is not None
    faulty = FaultyAnswerer(service.runner.adapter.answerer)
    service.runner.adapter.answerer = faulty  # type: ignore[assignment]
    faulty.gate = gate = threading.Event()  # the next model call waits here
    blocker = asyncio.ensure_future(client.post("/v1/vqa", data=form(easy_vqa_images[1].read_bytes())))
    while not faulty.batches:  # the model thread is inside the blocker's call
        await asyncio.sleep(0.01)
    follow_up = asyncio.ensure_future(client.post("/v1/vqa", data=form(image_id=image_id)))  # admitted: cached
    end = time.monotonic() + 10
    while service.collector.pending() == 0:
        assert time.monotonic() < end, "the follow-up never reached the queue"
        await asyncio.sleep(0.01)
    service.cache.clear()  # evicted before its model call (the model thread waits at the gate, off the cache)
    gate.set()
    assert (await blocker).status == 200
    resp = await follow_up
    assert resp.status == 409, await resp.text()
    assert (await resp.json())["error"]["code"] == "image_not_cached"
    assert service.runner.failures_in_a_row == 0  # not the model's fault
    again = await client.post("/v1/vqa", data=form(image))  # the client sends the image again
    assert again.status == 200


async def test_a_batch_answers_the_follow_ups_its_uploads_bring_and_fails_the_rest_alone(
        make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:
    """On the model thread: a follow-up whose image is not cached but is uploaded by another request of the same
    batch is answered (the upload's pixels are encoded once); one whose image nobody brings fails alone."""
    client = await make_client()
    service = app_of(client)[SERVICE]
    loaded = service.loaded
    assert loaded is not None
    upload = UploadPixels(loaded.image_res, 10**8)
    image = easy_vqa_images[2].read_bytes()
    key = hashlib.sha256(image).hexdigest()
    loop = asyncio.get_running_loop()

    def item(pixels: Any, image_key: str) -> WorkItem[VqaPayload]:
        q = loaded.tokenizer.encode([QUESTION])
        return WorkItem(VqaPayload(image_key, pixels, q.input_ids, q.attention_mask), 1, loop.create_future(),
                        time.monotonic() + 30)

    follow_up = item(None, key)  # before its upload in the batch, on purpose
    upload_item = item(upload.pixels(upload.decode(image)), key)
    stranger = item(None, "cd" * 32)
    misses = metric(client, "vqa_image_cache_misses_total")
    await service.runner.run(loop, [follow_up, upload_item, stranger])
    await asyncio.sleep(0)  # the settlements are scheduled on this loop
    assert follow_up.future.result().result[0].text == upload_item.future.result().result[0].text
    assert isinstance(stranger.future.exception(), ImageNotCached)
    assert metric(client, "vqa_image_cache_misses_total") == misses + 1  # one vision pass for the two
    assert service.cache.holds(key)
