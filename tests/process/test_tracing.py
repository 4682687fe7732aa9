"""OpenTelemetry traces (vqa_async/otel, docs/tracing.md): the spans of a request and of its batch on the app, a
real `serve` exporting over OTLP/HTTP to a receiver in the test and continuing a given traceparent, and, with no
OTEL variable, nothing exported and the SDK never imported."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import FormData
from cluster_support import stop_process
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import otlp_receiver

from bench.lib.loadgen import easy_vqa_requests
from vqa_async.app import init_app
from vqa_async.config import Settings
from vqa_async.otel import hooks
from vqa_async.otel.live import LiveTracing
from vqa_async.testing import launch
from vqa_async.testing.http import multipart

REQUEST_CHILDREN = {"read upload", "decode", "queue wait", "response"}


def traceparent() -> tuple[str, str, str]:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def form(image: bytes, *questions: str) -> FormData:
    f = FormData()
    f.add_field("image", image, filename="a.png", content_type="image/png")
    for q in questions:
        f.add_field("question", q)
    return f


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    hooks.install(LiveTracing.exporting_to(exporter))
    try:
        yield exporter
    finally:
        hooks.install(None)


async def test_a_request_is_a_span_with_its_stages_and_links_to_its_batch(
        aiohttp_client: Any, demo_dir: Path, exported: InMemorySpanExporter) -> None:
    client = await aiohttp_client(init_app(Settings(model=str(demo_dir), device="cpu", access_log="off")))
    pairs = easy_vqa_requests(4)
    given = [traceparent() for _ in pairs]

    async def ask(i: int) -> None:
        image, question = pairs[i]
        questions = [question] * (1 + i % 2)  # sizes 1 and 2: the batch's size is in questions
        async with client.post("/v1/vqa", data=form(image, *questions),
                               headers={"traceparent": given[i][0]}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["traceparent"] == given[i][0]  # echoed, as without tracing

    await asyncio.gather(*(ask(i) for i in range(len(pairs))))
    async with client.get("/readyz") as r:  # health checks are not traced
        assert r.status == 200
    async with client.get("/nowhere") as r:  # a 4xx is the client's error: the span is not marked failed
        assert r.status == 404
    async with client.post("/v1/vqa", data=b"x", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
    spans = exported.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    batches = [s for s in spans if s.name == "model call"]
    assert batches and all(s.attributes["vqa.batch_size"] >= 1 for s in batches)
    seen_in_batches = 0
    for _, trace_id, parent in given:
        [server] = [s for s in spans if s.kind.name == "SERVER" and f"{s.context.trace_id:032x}" == trace_id]
        assert server.name == "POST /v1/vqa" and f"{server.parent.span_id:016x}" == parent  # continued
        assert server.attributes["http.response.status_code"] == 200
        children = {s.name for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id}
        assert children >= REQUEST_CHILDREN, children
        [link] = server.links  # to the batch that answered it
        batch = by_id[link.context.span_id]
        assert batch.name == "model call" and server.attributes["vqa.batch_size"] == batch.attributes["vqa.batch_size"]
        # ...which links back to every request it answered, this one included, and counts their questions
        assert server.context.span_id in {lk.context.span_id for lk in batch.links}
        seen_in_batches += 1
    for batch in batches:
        answered = [by_id[lk.context.span_id] for lk in batch.links]
        assert batch.attributes["vqa.batch_requests"] == len(answered)
    assert seen_in_batches == len(given)
    assert sum(b.attributes["vqa.batch_size"] for b in batches) == sum(1 + i % 2 for i in range(len(pairs)))
    assert not [s for s in spans if s.attributes.get("url.path") == "/readyz"]
    [missing] = [s for s in spans if s.attributes.get("url.path") == "/nowhere"]
    assert missing.name == "GET" and missing.attributes["http.response.status_code"] == 404
    assert missing.status.status_code.name == "UNSET"
    [refused] = [s for s in spans if s.kind.name == "SERVER" and s.attributes["http.response.status_code"] == 415]
    assert refused.name == "POST /v1/vqa"


# -- a real serve -------------------------------------------------------------------------------------------------
def start_serve(demo_dir: Path, tmp: Path, env: dict[str, str], import_times: bool = False
                ) -> tuple[subprocess.Popen[bytes], str, Path, Path]:
    """A serve through the one launcher, in exactly `env` (no OTEL_* inherited); `import_times`: every module the
    process imports is listed on its stderr (PYTHONPROFILEIMPORTTIME, Python's -X importtime)."""
    log, err = tmp / "access.jsonl", tmp / "stderr.log"
    srv = launch.start_serve(demo_dir, access_log=log, log=err, base_env=env,
                             env={"PYTHONPROFILEIMPORTTIME": "1"} if import_times else None)
    return srv.proc, srv.url, log, err


def post(url: str, image: bytes, question: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    form = multipart(image, [question])  # the one multipart builder
    req = urllib.request.Request(url + "/v1/vqa", data=form.body, headers={"Content-Type": form.content_type,
                                                                          **headers})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.status, dict(r.headers)


def access_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, **extra}


def test_serve_exports_over_otlp_and_continues_a_given_traceparent(demo_dir: Path, tmp_path: Path) -> None:
    with otlp_receiver() as rec:
        proc, url, log, err = start_serve(demo_dir, tmp_path, clean_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=rec.base_url, OTEL_SERVICE_NAME="vqa-under-test",
            OTEL_BSP_SCHEDULE_DELAY="100"))
        try:
            (image, question), (image2, question2), (image3, question3) = easy_vqa_requests(3)
            tp, trace_id, parent = traceparent()
            status, headers = post(url, image, question, {"traceparent": tp})
            assert status == 200 and headers["traceparent"] == tp
            spans = rec.wait_for(lambda s: {x.name for x in s if x.trace_id == trace_id} >= {"POST /v1/vqa",
                                                                                             "model call"})
            in_trace = rec.trace(trace_id)
            [server] = [s for s in in_trace if s.name == "POST /v1/vqa"]
            assert server.parent_span_id == parent and server.kind == 2  # SPAN_KIND_SERVER
            assert server.resource["service.name"] == "vqa-under-test"  # the SDK's own variables are honoured
            assert {s.name for s in in_trace if s.parent_span_id == server.span_id} >= REQUEST_CHILDREN
            [batch] = [s for s in spans if s.name == "model call" and (trace_id, server.span_id) in
                       {(t, sp) for t, sp, _ in s.links}]
            assert batch.attributes["vqa.batch_size"] == 1 and (batch.trace_id, batch.span_id) in {
                (t, sp) for t, sp, _ in server.links}
            assert rec.content_types == {"application/x-protobuf"}
            # Without a traceparent: a trace of its own, whose id the access log carries.
            status, headers = post(url, image2, question2, {})
            assert status == 200 and "traceparent" not in headers
            rid = headers["X-Request-ID"]
            [line] = [x for x in access_lines(log) if x["request_id"] == rid]
            rec.wait_for(lambda s: any(x.trace_id == line["trace_id"] and x.name == "POST /v1/vqa" for x in s))
            # A traceparent that says "not sampled" is continued as such: nothing of it is exported (the
            # default sampler is parent-based).
            unsampled, unsampled_id, _ = traceparent()
            status, _ = post(url, image3, question3, {"traceparent": unsampled[:-2] + "00"})
            assert status == 200
            [line] = [x for x in access_lines(log) if x.get("trace_id") == unsampled_id]
            assert line["traceparent"] == unsampled[:-2] + "00"
            [tp_line] = [x for x in access_lines(log) if x.get("trace_id") == trace_id]
            assert tp_line["traceparent"] == tp
        finally:
            stop_process(proc)
        assert not rec.trace(unsampled_id)  # the SDK flushed at exit: whatever was to come has come
        assert "tracing on: OTLP/HTTP spans to" in err.read_text()


def test_with_no_otel_endpoint_nothing_is_exported_and_the_sdk_is_not_imported(demo_dir: Path,
                                                                               tmp_path: Path) -> None:
    with otlp_receiver() as rec:
        # Other OTEL variables alone do not turn tracing on; PYTHONPROFILEIMPORTTIME lists every module imported.
        proc, url, log, err = start_serve(demo_dir, tmp_path, clean_env(
            OTEL_SERVICE_NAME="vqa-under-test", OTEL_EXPORTER_OTLP_HEADERS="x=y", OTEL_BSP_SCHEDULE_DELAY="100"),
            import_times=True)
        try:
            (image, question), = easy_vqa_requests(1)
            tp, trace_id, _ = traceparent()
            status, headers = post(url, image, question, {"traceparent": tp})
            assert status == 200 and headers["traceparent"] == tp  # still echoed
            [line] = [x for x in access_lines(log) if x.get("traceparent") == tp]
            assert line["trace_id"] == trace_id  # and its trace id logged
        finally:
            stop_process(proc)
        imported = [ln for ln in err.read_text().splitlines() if ln.startswith("import time:")]
        assert any("vqa_async.otel.hooks" in ln for ln in imported)  # the check sees our modules...
        # ...and neither the SDK, its exporter, nor our side of it. (OpenTelemetry's API may be imported: transformers
        # imports it itself where it is installed; without the SDK it does nothing.)
        sdk = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.proto", "vqa_async.otel.live")
        assert not [ln for ln in imported if ln.rsplit("|", 1)[-1].strip().startswith(sdk)]
        assert rec.posts == 0


def test_the_endpoint_set_but_the_sdk_missing_is_said_at_start() -> None:
    """A fresh interpreter where the SDK cannot be imported, as on an install without the `otel` extra."""
    code = ("import logging, sys; sys.modules['opentelemetry.sdk'] = None; logging.basicConfig(); "
            "from vqa_async.otel import hooks; print(hooks.start_from_env(), hooks.active())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=clean_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9"))
    assert out.stdout.split() == ["False", "None"], out
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is set, but the OpenTelemetry SDK cannot be imported" in out.stderr
    assert "NO TRACES will be sent" in out.stderr and "pip install 'vqa-async[otel]'" in out.stderr


def test_tracing_off_the_hooks_do_nothing() -> None:
    assert hooks.active() is None
    marker = object()
    assert hooks.traced("x", marker) is marker  # type: ignore[arg-type]  # the awaitable itself, no wrapper
    assert hooks.current() is None
    with hooks.batch([], 3) as ctx, hooks.span("y"):
        assert ctx is None
    hooks.waited(0.0, 1.0, None, 1)

