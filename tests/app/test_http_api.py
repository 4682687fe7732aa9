"""The API through the real app and the real demo model: answers, batching, and every hard edge."""

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

from vqa_async.app import init_app
from vqa_async.config import Settings
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
    import threading

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
    import threading

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
    import threading

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
