"""The API through the real app and the real demo model: answers, batching, and every hard edge (readiness, form
limits, admission and the model's health: test_http_health.py)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from fakes import FaultyAnswerer
from PIL import Image

from vqa_async.http.app_keys import METRICS, SERVICE

ClientMaker = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def client(make_client: ClientMaker) -> TestClient[Any, Any]:
    return await make_client()


def png(path: Path) -> bytes:
    return path.read_bytes()


def form(image: bytes | None, *questions: str, filename: str = "x.png") -> FormData:
    f = FormData()
    if image is not None:
        f.add_field("image", image, filename=filename, content_type="image/png")
    for q in questions:
        f.add_field("question", q)
    return f


def metric(app: web.Application, name: str, labels: dict[str, str] | None = None) -> float:
    return app[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


async def test_multipart_answer_with_timings(client: TestClient[Any, Any], easy_vqa_images: list[Path],
                                             demo_dir: Path) -> None:
    resp = await client.post("/v1/vqa", data=form(png(easy_vqa_images[0]), "what color is the shape?"))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert isinstance(body["answer"], str) and body["answer"]
    assert body["model"] == demo_dir.name
    assert body["batch_size"] >= 1 and body["compute_ms"] > 0 and body["queue_ms"] >= 0
    # The bench's profile reads where the time went from these.
    app = client.server.app
    assert app is not None
    for stage in ("decode", "preprocess", "vision", "decoder"):
        assert metric(app, "vqa_stage_seconds_total", {"stage": stage}) > 0, stage
        assert metric(app, "vqa_stage_cpu_seconds_total", {"stage": stage}) >= 0, stage


async def test_repeated_question_field_gives_answers(client: TestClient[Any, Any],
                                                     easy_vqa_images: list[Path]) -> None:
    qs = ["what color is the shape?", "what is the shape?"]
    resp = await client.post("/v1/vqa", data=form(png(easy_vqa_images[0]), *qs))
    body = await resp.json()
    assert len(body["answers"]) == 2
    for q, a in zip(qs, body["answers"]):
        single = await (await client.post("/v1/vqa", data=form(png(easy_vqa_images[0]), q))).json()
        assert single["answer"] == a


async def test_json_base64(client: TestClient[Any, Any], easy_vqa_images: list[Path]) -> None:
    b64 = base64.b64encode(png(easy_vqa_images[1])).decode()
    one = await (await client.post("/v1/vqa", json={"image": b64, "question": "what is the shape?"})).json()
    many = await (await client.post("/v1/vqa", json={"image": "data:image/png;base64," + b64,
                                                      "questions": ["what is the shape?"]})).json()
    assert many["answers"] == [one["answer"]]


async def test_tutorial_endpoint_shape(client: TestClient[Any, Any], easy_vqa_images: list[Path],
                                       demo_dir: Path) -> None:
    resp = await client.post("/vqa", data=form(png(easy_vqa_images[0]), "what color is the shape?"))
    body = await resp.json()
    assert body["status"] == "success" and body["answer"] and body["model_used"] == demo_dir.name
    resp = await client.post("/vqa", data=form(None, "what?"))
    assert resp.status == 400
    body = await resp.json()
    assert body["status"] == "error" and body["message"]


async def test_concurrent_requests_are_batched_and_equal_alone(make_client: ClientMaker) -> None:
    import easy_vqa

    client = await make_client(max_batch_size=16, max_wait_ms=20)
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    reqs = [(Path(paths[image_ids[i]]).read_bytes(), questions[i]) for i in range(24)]

    async def ask(img: bytes, q: str) -> str:
        resp = await client.post("/v1/vqa", data=form(img, q))
        assert resp.status == 200
        return str((await resp.json())["answer"])

    together = await asyncio.gather(*(ask(i, q) for i, q in reqs))
    app = client.server.app
    assert app is not None
    batches = metric(app, "vqa_batch_size_count")
    assert metric(app, "vqa_batch_size_sum") / batches > 1, "concurrent requests should share model calls"
    alone = [await ask(i, q) for i, q in reqs]
    assert together == alone


async def test_same_image_reuses_the_cached_vision_pass(client: TestClient[Any, Any],
                                                        easy_vqa_images: list[Path]) -> None:
    img = png(easy_vqa_images[2])
    await client.post("/v1/vqa", data=form(img, "what color is the shape?"))
    app = client.server.app
    assert app is not None
    hits = metric(app, "vqa_image_cache_hits_total")
    await client.post("/v1/vqa", data=form(img, "what is the shape?"))
    assert metric(app, "vqa_image_cache_hits_total") == hits + 1


def _image_bytes(fmt: str, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt)
    return buf.getvalue()


GOOD = _image_bytes("PNG")
BAD_MULTIPART = [
    ("missing image", form(None, "what?"), 400, "missing_image"),
    ("missing question", form(GOOD), 400, "missing_question"),
    ("empty file", form(b"", "what?"), 400, "empty_image"),
    ("not an image", form(b"%PDF-1.4 hello", "what?"), 400, "invalid_image"),
    ("truncated", form(GOOD[: len(GOOD) // 2], "what?"), 400, "invalid_image"),
    ("unsupported format", form(_image_bytes("ICO"), "what?"), 400, "unsupported_image_format"),
    ("empty question", form(GOOD, "   "), 400, "empty_question"),
    ("long question", form(GOOD, "why " * 200), 400, "question_too_long"),
    ("long once padded", form(GOOD, "what?" + " " * 600), 400, "question_too_long"),  # the bound /openapi.json says
    ("too many questions", form(GOOD, *["what?"] * 17), 400, "too_many_questions"),
]


@pytest.mark.parametrize("name, data, status, code", BAD_MULTIPART, ids=[b[0] for b in BAD_MULTIPART])
async def test_bad_multipart_is_a_clear_4xx(client: TestClient[Any, Any], easy_vqa_images: list[Path], name: str,
                                            data: FormData, status: int, code: str) -> None:
    resp = await client.post("/v1/vqa", data=data)
    assert resp.status == status
    body = await resp.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in await resp.text()
    ok = await client.post("/v1/vqa", data=form(png(easy_vqa_images[0]), "what color is the shape?"))
    assert ok.status == 200  # and the server keeps answering


BAD_RAW = [
    ("invalid json", b"{not json", "application/json", 400, "invalid_json"),
    ("json not object", b"[1, 2]", "application/json", 400, "invalid_json"),
    ("invalid base64", b'{"image": "***", "question": "what?"}', "application/json", 400, "invalid_base64"),
    ("json invalid utf-8", b'{"image": "aGk=", "question": "\xff\xfe"}', "application/json", 400, "invalid_utf8"),
    ("question not a string", b'{"image": "aGk=", "question": 3}', "application/json", 400, "invalid_field"),
    ("wrong content type", b"hello", "text/plain", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("name, raw, ctype, status, code", BAD_RAW, ids=[b[0] for b in BAD_RAW])
async def test_bad_body_is_a_clear_4xx(client: TestClient[Any, Any], name: str, raw: bytes, ctype: str, status: int,
                                       code: str) -> None:
    resp = await client.post("/v1/vqa", data=raw, headers={"Content-Type": ctype})
    assert resp.status == status
    assert (await resp.json())["error"]["code"] == code


async def test_invalid_utf8_in_a_form_field(client: TestClient[Any, Any]) -> None:
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + GOOD + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n").encode() + \
        b"what \xff\xfe?" + f"\r\n--{boundary}--\r\n".encode()
    ctype = f"multipart/form-data; boundary={boundary}"
    resp = await client.post("/v1/vqa", data=body, headers={"Content-Type": ctype})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_utf8"


async def test_a_malformed_part_header_is_400_not_500(client: TestClient[Any, Any]) -> None:
    """A control character in a part's Content-Disposition made aiohttp raise InvalidHeader: that was a 500
    (found by the contract test)."""
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"a\x1fb\"\r\n\r\nx\r\n--{boundary}--\r\n").encode()
    for path in ("/v1/vqa", "/vqa"):
        resp = await client.post(path, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert resp.status == 400, await resp.text()
        assert "invalid_multipart" in await resp.text()


async def test_decompression_bomb_is_413_not_500(make_client: ClientMaker) -> None:
    client = await make_client(max_pixels=1_000_000)
    bomb = _image_bytes("PNG", (5000, 5000), "L")  # small file, 25 M pixels
    resp = await client.post("/v1/vqa", data=form(bomb, "what?"))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "image_too_large"


async def test_body_over_the_limit_is_413(make_client: ClientMaker) -> None:
    client = await make_client(max_body_mb=0.05)
    resp = await client.post("/v1/vqa", data=form(b"\0" * 200_000, "what?"))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_unknown_route_and_method_are_json(client: TestClient[Any, Any]) -> None:
    r = await client.get("/nope")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.get("/v1/vqa")
    assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


def inject(client: TestClient[Any, Any], **kw: Any) -> FaultyAnswerer:
    app = client.server.app
    assert app is not None
    ex = app[SERVICE].runner.adapter
    assert ex.answerer is not None
    faulty = FaultyAnswerer(ex.answerer, **kw)
    ex.answerer = faulty  # type: ignore[assignment]
    return faulty


async def test_a_request_that_breaks_the_model_fails_alone(make_client: ClientMaker,
                                                           easy_vqa_images: list[Path]) -> None:
    client = await make_client(max_batch_size=16, max_wait_ms=50)
    app = client.server.app
    assert app is not None
    poison = app[SERVICE].loaded.tokenizer.encode(["circle"]).input_ids[0, 1].item()  # type: ignore[union-attr]
    inject(client, poison_token=int(poison))
    img = png(easy_vqa_images[0])
    qs = ["what color is the shape?"] * 5 + ["is there a circle?"]
    resps = await asyncio.gather(*(client.post("/v1/vqa", data=form(img, q)) for q in qs))
    statuses = [r.status for r in resps]
    assert statuses == [200] * 5 + [500]
    err = (await resps[-1].json())["error"]
    assert err["code"] == "model_error"
    assert resps[-1].headers.get("X-Error-Id")
    ok = await client.post("/v1/vqa", data=form(img, "what is the shape?"))
    assert ok.status == 200


async def test_out_of_memory_splits_the_batch(make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:
    client = await make_client(max_batch_size=16, max_wait_ms=50)
    inject(client, oom_above=2)
    img = png(easy_vqa_images[0])
    # Eight questions in one request are one model call of eight rows, whatever the timing: the OOM path runs.
    r = await client.post("/v1/vqa", data=form(img, *["what color is the shape?"] * 8))
    assert r.status == 200 and len((await r.json())["answers"]) == 8
    resps = await asyncio.gather(*(client.post("/v1/vqa", data=form(img, "what color is the shape?"))
                                   for _ in range(8)))
    assert [r.status for r in resps] == [200] * 8
    app = client.server.app
    assert app is not None
    assert metric(app, "vqa_batch_failures_total", {"kind": "oom"}) >= 1
    assert metric(app, "vqa_batch_cap") <= 2


async def test_full_queue_answers_503_at_once(make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:
    client = await make_client(max_queue=2, max_batch_size=1)
    faulty = inject(client)
    import threading

    faulty.gate = threading.Event()  # the model thread blocks until we open the gate
    img = png(easy_vqa_images[0])
    tasks = [asyncio.create_task(client.post("/v1/vqa", data=form(img, "what color is the shape?")))
             for _ in range(8)]
    done = []
    for _ in range(100):
        await asyncio.sleep(0.02)
        done = [t for t in tasks if t.done()]
        if len(done) >= 5:
            break
    rejected = [t.result() for t in done]
    assert rejected and all(r.status == 503 for r in rejected)
    assert all(r.headers.get("Retry-After") for r in rejected)
    assert (await rejected[0].json())["error"]["code"] == "overloaded"
    faulty.gate.set()
    rest = await asyncio.gather(*tasks)
    assert sum(r.status == 200 for r in rest) >= 2


async def test_past_deadline_is_504(make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:
    client = await make_client(timeout_s=0.3)
    inject(client, delay_s=1.0)
    resp = await client.post("/v1/vqa", data=form(png(easy_vqa_images[0]), "what color is the shape?"))
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "timeout"


async def test_client_that_left_is_dropped_before_the_model(make_client: ClientMaker,
                                                            easy_vqa_images: list[Path]) -> None:
    import threading

    client = await make_client(max_batch_size=1)
    faulty = inject(client)
    faulty.gate = threading.Event()
    img = png(easy_vqa_images[0])
    first = asyncio.create_task(client.post("/v1/vqa", data=form(img, "what color is the shape?")))
    await asyncio.sleep(0.3)  # the first request holds the model thread
    leaver = asyncio.create_task(client.post("/v1/vqa", data=form(img, "is there a circle?")))
    await asyncio.sleep(0.3)  # queued behind it
    leaver.cancel()  # the client disconnects
    await asyncio.sleep(0.3)
    faulty.gate.set()
    assert (await first).status == 200
    app = client.server.app
    assert app is not None
    for _ in range(50):
        if metric(app, "vqa_dropped_requests_total", {"reason": "client_left"}) >= 1:
            break
        await asyncio.sleep(0.05)
    assert metric(app, "vqa_dropped_requests_total", {"reason": "client_left"}) >= 1
    assert len(faulty.batches) == 1  # the leaver never reached the model


async def test_health_ready_metrics_openapi(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    text = await (await client.get("/metrics")).text()
    for name in ("vqa_requests_total", "vqa_request_latency_seconds", "vqa_queue_depth", "vqa_batch_size",
                 "vqa_queue_wait_seconds", "vqa_compute_seconds", "vqa_image_cache_hits_total",
                 "vqa_dropped_requests_total", "process_cpu_seconds_total"):
        assert name in text, name
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    app = client.server.app
    assert app is not None
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource is not None
              and r.method != "HEAD"}
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert routes == documented
    # The spec itself is valid OpenAPI 3.
    from openapi_spec_validator import validate

    validate(spec)
