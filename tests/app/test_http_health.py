"""The app's readiness, form limits, admission of uploads still decoding, and the model's health (sick, hung),
through the real app and the real demo model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from fakes import FaultyAnswerer
from test_http_api import form, inject, png

from vqa_async.app import init_app
from vqa_async.config import Settings
from vqa_async.http.app_keys import SERVICE

ClientMaker = Callable[..., Awaitable[TestClient[Any, Any]]]


async def test_not_ready_before_the_model_is_loaded(demo_dir: Path) -> None:
    app = init_app(Settings(model=str(demo_dir), device="cpu"))
    from vqa_async.http.handlers import readyz

    req = __import__("aiohttp.test_utils", fromlist=["make_mocked_request"]).make_mocked_request("GET", "/readyz",
                                                                                                 app=app)
    resp = await readyz(req)
    assert resp.status == 503


@pytest.mark.parametrize("disposition", [
    'form-data; name="image"; filename="image.png"', 'form-data; name="question"', 'form-data; name="q"',
    'form-data; name="image"; filename="café photo.jpg"', 'form-data; name="image"; filename=""',
    'form-data; name=image; filename=a.png', 'form-data; name="a\\"b"', "form-data; name=\"image\"; "
    "filename*=utf-8''%E2%82%AC.png", 'form-data; filename="x.png"; name="image"', 'FORM-DATA; NAME="image"', "",
    'form-data; name="/image"; filename="a.png"', 'form-data; name="image"; filename="/"',
    'form-data; name="image"; filename="\\x.png"', 'form-data; name=""'])
def test_form_part_names_match_aiohttps_parser(disposition: str) -> None:
    # The fast path reads the usual header with a regex; whatever it reads must be what aiohttp would read.
    from aiohttp import BodyPartReader
    from multidict import CIMultiDict, CIMultiDictProxy

    from vqa_async.http.parse import part_names

    headers = CIMultiDict({"Content-Disposition": disposition} if disposition else {})
    part = BodyPartReader(b"--x", CIMultiDictProxy(headers), None)  # type: ignore[arg-type]
    assert part_names(part) == (part.name, part.filename)


async def test_too_many_form_parts_is_400_before_reading_on(make_client: ClientMaker,
                                                            easy_vqa_images: list[Path]) -> None:
    client = await make_client(max_form_parts=20)
    f = form(png(easy_vqa_images[0]), "what color is the shape?")
    for i in range(40):
        f.add_field(f"extra{i}", "x")
    resp = await client.post("/v1/vqa", data=f)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "too_many_parts"
    ok = await client.post("/v1/vqa", data=form(png(easy_vqa_images[0]), *["what color is the shape?"] * 16))
    assert ok.status == 200  # the image and the most questions allowed stay well inside the bound


async def test_a_body_that_trickles_is_408(make_client: ClientMaker) -> None:
    client = await make_client(body_timeout_s=0.5)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /v1/vqa HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"image\": \"")  # then nothing more
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in head


async def test_admission_counts_uploads_still_being_decoded(make_client: ClientMaker,
                                                            easy_vqa_images: list[Path]) -> None:
    """Requests in preprocessing used not to count toward the queue bound: under overload the CPU decoded
    uploads that then got 503. Now the bound covers them, and the pool's backlog is bounded."""

    client = await make_client(max_queue=4, preprocess_threads=1)
    app = client.server.app
    assert app is not None
    service = app[SERVICE]
    gate, started = threading.Event(), []
    real_prepare = service._prepare

    def slow_prepare(image: bytes, questions: list[str], scope: bytes) -> Any:
        started.append(1)
        gate.wait(30)
        return real_prepare(image, questions, scope)

    service._prepare = slow_prepare  # type: ignore[method-assign]
    img = png(easy_vqa_images[0])
    tasks = [asyncio.create_task(client.post("/v1/vqa", data=form(img, "what color is the shape?")))
             for _ in range(10)]
    for _ in range(200):
        await asyncio.sleep(0.02)
        if sum(t.done() for t in tasks) >= 6:
            break
    refused = [t.result() for t in tasks if t.done()]
    assert len(refused) == 6 and all(r.status == 503 for r in refused)
    gate.set()
    assert sum(r.status == 200 for r in await asyncio.gather(*tasks)) == 4
    assert len(started) == 4, "only admitted uploads are decoded"


@pytest.mark.parametrize("inline_kb", [16.0, 0.0])
async def test_small_uploads_are_decoded_on_the_loop_and_large_ones_in_the_pool(
        make_client: ClientMaker, easy_vqa_images: list[Path], inline_kb: float) -> None:
    """--inline-prepare-kb: an upload up to that size is decoded on the event loop (no hand-over to a thread and
    back); a larger one, or every one with 0, goes to the preprocessing pool. Same answer either way."""

    client = await make_client(inline_prepare_kb=inline_kb)
    app = client.server.app
    assert app is not None
    service = app[SERVICE]
    threads: list[str] = []
    real_prepare = service._prepare

    def spy(image: bytes, questions: list[str], scope: bytes) -> Any:
        threads.append(threading.current_thread().name)
        return real_prepare(image, questions, scope)

    service._prepare = spy  # type: ignore[method-assign]
    small = png(easy_vqa_images[0])
    assert len(small) < 16 * 1024
    large = small + b"\0" * (20 * 1024)  # the same pixels (bytes after IEND are ignored), 20 KB more
    answers = []
    for img in (small, large):
        r = await client.post("/v1/vqa", data=form(img, "what color is the shape?"))
        assert r.status == 200, await r.text()
        answers.append((await r.json())["answer"])
    assert answers[0] == answers[1]
    on_loop = threading.main_thread().name
    if inline_kb:
        assert threads[0] == on_loop and threads[1].startswith("vqa-preprocess"), threads
    else:
        assert all(t.startswith("vqa-preprocess") for t in threads), threads
    metrics = await (await client.get("/metrics")).text()
    assert 'vqa_stage_cpu_seconds_total{stage="decode"}' in metrics  # counted on the loop too


async def test_a_sick_model_is_not_ready_and_a_probe_brings_it_back(make_client: ClientMaker,
                                                                    easy_vqa_images: list[Path]) -> None:
    client = await make_client(sick_after_failures=3)
    app = client.server.app
    assert app is not None
    poison_all = FaultyAnswerer(app[SERVICE].runner.adapter.answerer, poison_token=101)  # [CLS] is in every question
    real = app[SERVICE].runner.adapter.answerer
    app[SERVICE].runner.adapter.answerer = poison_all  # type: ignore[assignment]
    img = png(easy_vqa_images[0])
    for _ in range(3):
        assert (await client.post("/v1/vqa", data=form(img, "what color is the shape?"))).status == 500
    ready = await client.get("/readyz")
    assert ready.status == 503 and "failed in the model" in (await ready.json())["error"]["message"]
    refused = await client.post("/v1/vqa", data=form(img, "what color is the shape?"))
    assert refused.status == 503 and (await refused.json())["error"]["code"] == "not_ready"
    assert (await client.get("/healthz")).status == 200  # alive: a supervisor decides on restarts
    app[SERVICE].runner.adapter.answerer = real  # the fault goes away: the next probe sees it
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/v1/vqa", data=form(img, "what color is the shape?"))).status == 200


async def test_a_hung_model_call_fails_liveness_and_requests_still_end_at_their_deadline(
        make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:

    client = await make_client(stuck_timeout_s=0.5, timeout_s=1.0)
    faulty = inject(client)
    faulty.gate = threading.Event()
    img = png(easy_vqa_images[0])
    t0 = asyncio.get_running_loop().time()
    resp = await client.post("/v1/vqa", data=form(img, "what color is the shape?"))
    assert resp.status == 504 and asyncio.get_running_loop().time() - t0 < 5
    health = await client.get("/healthz")
    assert health.status == 503 and (await health.json())["error"]["code"] == "not_alive"
    assert (await client.get("/readyz")).status == 503
    faulty.gate.set()
    for _ in range(100):
        if (await client.get("/healthz")).status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await client.get("/healthz")).status == 200
