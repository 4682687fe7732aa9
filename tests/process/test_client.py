"""vqa_async.client: the same answers as a direct POST from a real `serve`, photos shrunk before upload, retries
on 503/429 (Retry-After) and on refused connections, a concurrency limit, errors with their codes, no torch."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from client_support import API_KEY, Serve, direct_post, free_port, serve
from PIL import Image

from vqa_async.client import AsyncClient, Client, VqaError
from vqa_async.client.upload import UPLOAD_BUDGET

QUESTIONS = ["what color is the shape?", "what shape is this?", "is there a circle?"]


@pytest.fixture(scope="module")
def srv(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    yield from serve(demo_dir, tmp_path_factory.mktemp("client_serve"))


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    """A 4032 x 3024 JPEG (a phone's 12 MP) that a phone held upright took: EXIF orientation 6 (turn 90°)."""
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((4032, 3024), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def test_the_client_imports_no_torch() -> None:
    code = ("import sys\nfrom vqa_async.client import AsyncClient, Client, VqaError\n"
            "heavy = [m for m in ('torch', 'modelscope', 'torchvision', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_answers_equal_a_direct_post(srv: Serve, easy_vqa_images: list[Path]) -> None:
    before = len(srv.log_lines())
    with Client(srv.url, api_key=API_KEY) as vqa:
        for path in easy_vqa_images[:3]:
            data = path.read_bytes()
            want = direct_post(srv.url, data, QUESTIONS[:1])["answer"]
            got = vqa.ask(path, QUESTIONS[0])
            assert got.answer == want and got.answers == (want,)
            assert got.upload_bytes in (0, len(data))  # sent as it is (or, once answered, by its id)
            assert got.model and got.request_id and got.attempts >= 1
            # bytes, str paths and PIL images are the same image
            assert vqa.ask(data, QUESTIONS[0]).answer == want
            with Image.open(path) as pil:
                assert vqa.ask(pil.copy(), QUESTIONS[0]).answer == want
            assert vqa.ask(vqa.prepare(path), QUESTIONS[0]).answer == want  # prepared ahead, as jobs do
        many = dict(vqa.ask_many((p, QUESTIONS[0]) for p in easy_vqa_images[:3]))  # the sync ask_many too
        assert sorted(many) == [0, 1, 2] and all(not isinstance(a, VqaError) and a.answer for a in many.values())
        path = easy_vqa_images[3]
        want_many = direct_post(srv.url, path.read_bytes(), QUESTIONS)["answers"]
        assert list(vqa.ask(str(path), questions=QUESTIONS).answers) == want_many
    uploads = [line for line in srv.log_lines()[before:] if line["route"] == "/v1/vqa"]
    assert uploads and {line["client"] for line in uploads} == {"tester"}  # the key went as Authorization


async def test_async_client_and_ask_many_answer_every_image(srv: Serve, easy_vqa_images: list[Path]) -> None:
    want = {i: direct_post(srv.url, p.read_bytes(), QUESTIONS[:1])["answer"] for i, p in enumerate(easy_vqa_images)}
    async with AsyncClient(srv.url, api_key=API_KEY, concurrency=3) as vqa:
        got = {i: a async for i, a in vqa.ask_many((p, QUESTIONS[0]) for p in easy_vqa_images)}
    assert {i: a.answer for i, a in got.items() if not isinstance(a, VqaError)} == want


def test_a_12mp_photo_is_sent_shrunk_and_upright(srv: Serve, photo_12mp: bytes) -> None:
    before = len(srv.log_lines())
    with Client(srv.url, api_key=API_KEY) as vqa:
        answer = vqa.ask(photo_12mp, "what color is the shape?")
    assert answer.answer
    sent = [line for line in srv.log_lines()[before:] if line["route"] == "/v1/vqa"]
    assert len(sent) == 1 and sent[0]["status"] == 200
    # the demo model's input is 64 px (its /readyz says so), so the photo leaves as a JPEG of at most 128 px: a few
    # KB, not 3 MB
    with urllib.request.urlopen(srv.url + "/readyz", timeout=5) as r:
        assert json.loads(r.read())["image_res"] == 64
    assert answer.upload_bytes < 20_000 and sent[0]["upload_bytes"] < 20_000 < len(photo_12mp)


async def test_the_shrunk_photo_is_twice_the_model_input_upright_rgb_jpeg(
        aiohttp_server: Any, photo_12mp: bytes, easy_vqa_images: list[Path]) -> None:
    got: list[bytes] = []

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "image_res": 504})

    async def vqa(request: web.Request) -> web.Response:
        form = await request.post()
        got.append(form["image"].file.read())  # type: ignore[union-attr]
        return web.json_response({"answer": "ok"})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/vqa", vqa)
    fake = await aiohttp_server(app)
    async with AsyncClient(str(fake.make_url(""))) as client:
        await client.ask(photo_12mp, "q")
        small = easy_vqa_images[0].read_bytes()
        await client.ask(small, "q")
    with Image.open(io.BytesIO(got[0])) as shrunk:
        assert shrunk.format == "JPEG" and shrunk.mode == "RGB"
        assert shrunk.size == (756, 1008)  # 3024 x 4032 upright, longer side 2 x 504
        assert not shrunk.getexif().get(0x0112)
    assert len(got[0]) < UPLOAD_BUDGET < len(photo_12mp)
    assert got[1] == small  # a small PNG goes as it is


def _answering_after(statuses: list[tuple[int, str]], seen: list[tuple[float, str]]) -> web.Application:
    """A server that answers `statuses` in turn ((status, Retry-After)), then 200; `seen` gets (time, request id)."""

    async def vqa(request: web.Request) -> web.Response:
        await request.read()
        seen.append((time.monotonic(), request.headers.get("X-Request-ID", "")))
        if statuses:
            status, retry_after = statuses.pop(0)
            code = "overloaded" if status == 503 else "too_many_requests"
            return web.json_response({"error": {"code": code, "message": "later"}}, status=status,
                                     headers={"Retry-After": retry_after})
        return web.json_response({"answer": "blue", "image_id": "abc"})

    app = web.Application()
    app.router.add_post("/v1/vqa", vqa)
    return app


async def test_503_and_429_are_retried_after_retry_after(aiohttp_server: Any) -> None:
    seen: list[tuple[float, str]] = []
    fake = await aiohttp_server(_answering_after([(503, "1"), (429, "1")], seen))
    async with AsyncClient(str(fake.make_url("")), max_side=0, backoff_s=0.05) as client:
        answer = await client.ask(b"not an image", "q")
    assert answer.answer == "blue" and answer.attempts == 3
    waits = [b[0] - a[0] for a, b in zip(seen, seen[1:])]
    assert all(w >= 1.0 for w in waits), waits  # Retry-After honoured, not the short back-off
    assert len({rid for _, rid in seen}) == 1  # one request id for every attempt


async def test_retries_are_bounded_and_the_error_keeps_its_code(aiohttp_server: Any) -> None:
    seen: list[tuple[float, str]] = []
    fake = await aiohttp_server(_answering_after([(503, "0")] * 5, seen))
    async with AsyncClient(str(fake.make_url("")), max_side=0, retries=2, backoff_s=0.01) as client:
        with pytest.raises(VqaError) as e:
            await client.ask(b"x", "q")
    assert (e.value.status, e.value.code) == (503, "overloaded") and e.value.retry_after_s == 0
    assert len(seen) == 3


async def test_a_refused_connection_is_retried_until_the_server_comes_up() -> None:
    port = free_port()
    seen: list[tuple[float, str]] = []
    async with AsyncClient(f"http://127.0.0.1:{port}", max_side=0, retries=8, backoff_s=0.1,
                           max_backoff_s=0.4) as client:
        asking = asyncio.create_task(client.ask(b"x", "q"))
        await asyncio.sleep(1.0)
        assert not asking.done()  # refused so far, still trying
        server = TestServer(_answering_after([], seen), port=port)
        await server.start_server()
        try:
            answer = await asking
        finally:
            await server.close()
    assert answer.answer == "blue" and answer.attempts > 2 and len(seen) == 1


async def test_a_dropped_connection_is_retried_and_a_slow_answer_is_not(aiohttp_server: Any) -> None:
    calls = 0

    async def vqa(request: web.Request) -> web.Response:
        nonlocal calls
        await request.read()
        calls += 1
        if calls == 1:  # a worker dying mid-request: the connection closes with no answer
            assert request.transport is not None
            request.transport.close()
        if request.headers.get("X-Slow"):
            await asyncio.sleep(2)
        return web.json_response({"answer": "ok"})

    app = web.Application()
    app.router.add_post("/v1/vqa", vqa)
    fake = await aiohttp_server(app)
    async with AsyncClient(str(fake.make_url("")), max_side=0, backoff_s=0.05) as client:
        answer = await client.ask(b"x", "q")
        assert answer.attempts == 2 and calls == 2
    # a timeout is the server being slow, not gone: asking again would only add load
    async with AsyncClient(str(fake.make_url("")), max_side=0, timeout_s=0.3) as client:
        client._http().headers["X-Slow"] = "1"
        with pytest.raises(VqaError) as e:
            await client.ask(b"x", "q")
    assert (e.value.status, e.value.code) == (0, "client_timeout") and calls == 3


async def test_with_no_server_at_all_the_error_says_so() -> None:
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", max_side=0, retries=2, backoff_s=0.01) as client:
        with pytest.raises(VqaError) as e:
            await client.ask(b"x", "q")
    assert (e.value.status, e.value.code) == (0, "connection_failed")


async def test_concurrency_is_limited(aiohttp_server: Any) -> None:
    inflight = peak = 0

    async def vqa(request: web.Request) -> web.Response:
        nonlocal inflight, peak
        await request.read()
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.05)
        inflight -= 1
        return web.json_response({"answer": "ok"})

    app = web.Application()
    app.router.add_post("/v1/vqa", vqa)
    fake = await aiohttp_server(app)
    async with AsyncClient(str(fake.make_url("")), max_side=0, concurrency=3) as client:
        results = [r async for r in client.ask_many((b"x%d" % i, "q") for i in range(12))]
        # ask itself is bounded too, however many tasks call it
        await asyncio.gather(*(client.ask(b"y", "q") for _ in range(9)))
    assert len(results) == 12 and peak == 3


def test_errors_carry_the_status_and_the_stable_code(srv: Serve, tmp_path: Path) -> None:
    with Client(srv.url, api_key=API_KEY, retries=0) as vqa:
        with pytest.raises(VqaError) as e:
            vqa.ask(b"this is not an image", "q")
        assert e.value.status == 400 and e.value.code in ("invalid_image", "unsupported_image_format")
        assert e.value.request_id
        with pytest.raises(VqaError) as e:
            vqa.ask(tmp_path / "missing.png", "q")
        assert (e.value.status, e.value.code) == (0, "image_unreadable")
    with Client(srv.url, api_key="wrong") as vqa, pytest.raises(VqaError) as e:
        vqa.ask(b"x", "q")
    assert (e.value.status, e.value.code) == (401, "unauthorized")


def test_follow_ups_go_by_image_id_and_the_image_is_sent_again_when_not_cached(
        srv: Serve, easy_vqa_images: list[Path]) -> None:
    path = easy_vqa_images[5]
    data = path.read_bytes()
    with Client(srv.url, api_key=API_KEY) as vqa:
        first = vqa.ask(path, QUESTIONS[0])
        assert first.image_id and first.upload_bytes == len(data)
        before = len(srv.log_lines())
        follow = vqa.ask(path, questions=QUESTIONS[1:])
        assert follow.upload_bytes == 0 and follow.image_id == first.image_id and follow.attempts == 1
        assert list(follow.answers) == direct_post(srv.url, data, QUESTIONS[1:])["answers"]
        (line,) = [x for x in srv.log_lines()[before:] if x["request_id"] == follow.request_id]
        assert line["status"] == 200 and line["upload_bytes"] < 1000  # the id and questions only
        # an explicit id alone; and one the server does not hold, with the image to fall back on
        assert vqa.ask(image_id=first.image_id, question=QUESTIONS[0]).answer == first.answer
        with pytest.raises(VqaError) as e:
            vqa.ask(image_id="0" * 64, question=QUESTIONS[0])
        assert (e.value.status, e.value.code) == (409, "image_not_cached")
        again = vqa.ask(path, QUESTIONS[0], image_id="0" * 64)
        assert again.answer == first.answer and again.upload_bytes == len(data) and again.attempts == 2
