"""A trace through a real cluster (docs/tracing.md): HAProxy starts the trace of a request that brings none, and
the same trace id is in HAProxy's log line, the worker's access log and the spans its worker exports over OTLP to a
receiver in the test: the request's server span (its parent HAProxy's span id), its stages, and its batch's span."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from cluster_support import start_cluster, stop_cluster
from otlp_receiver import Receiver, otlp_receiver

from bench.lib.loadgen import easy_vqa_requests
from vqa_async.testing.http import multipart

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


def post(url: str, image: bytes, question: str, headers: dict[str, str]) -> dict[str, str]:
    form = multipart(image, [question])  # the one multipart builder
    req = urllib.request.Request(url + "/v1/vqa", data=form.body, headers={"Content-Type": form.content_type,
                                                                          **headers})
    for _ in range(3):  # as a client does on a 503 with Retry-After (a shared box can starve the one worker)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
                return {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            if e.code != 503:
                raise
            print("503, retried:", e.read()[:300])
            time.sleep(float(e.headers.get("Retry-After", "1")))
    raise AssertionError("503 three times")


def line_of(path: Path, request_id: str, wait_s: float = 10) -> dict[str, Any]:
    """The JSON log line of `request_id` in `path` (a line is written as the answer leaves: give it a moment)."""
    end = time.monotonic() + wait_s
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = [rec for ln in text.splitlines() if ln.startswith("{")
                 and (rec := json.loads(ln)).get("request_id") == request_id]
        if found or time.monotonic() > end:
            assert len(found) == 1, (request_id, text[-2000:])
            return found[0]
        time.sleep(0.1)


def worker_trace(rec: Receiver, trace_id: str) -> list[Any]:
    """The spans of `trace_id`, once its server span and its batch's span have come."""
    rec.wait_for(lambda spans: {s.name for s in spans if s.trace_id == trace_id} >= {"POST /v1/vqa", "model call"})
    return rec.trace(trace_id)


def test_one_trace_id_from_haproxy_to_the_worker_spans_and_both_logs(tmp_path: Path, demo_dir: Path) -> None:
    access, front_log = tmp_path / "access.jsonl", tmp_path / "cluster.log"
    with otlp_receiver() as rec:
        cl = start_cluster(tmp_path, demo_dir, "--haproxy-log", "--access-log", str(access), workers=1,
                           env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": rec.url, "OTEL_BSP_SCHEDULE_DELAY": "100"},
                           log_to=front_log)
        try:
            (image, question), (image2, question2), (image3, question3) = easy_vqa_requests(3)
            # No traceparent: HAProxy starts the trace.
            headers = post(cl.url, image, question, {})
            m = TRACEPARENT.fullmatch(headers["traceparent"])
            assert m, headers
            trace_id, haproxy_span = m.groups()
            rid = headers["x-request-id"]
            assert line_of(front_log, rid)["trace_id"] == trace_id  # HAProxy's log line
            worker_line = line_of(access, rid)  # the worker's access log
            assert worker_line["trace_id"] == trace_id and worker_line["traceparent"] == headers["traceparent"]
            in_trace = worker_trace(rec, trace_id)
            [server] = [s for s in in_trace if s.name == "POST /v1/vqa"]
            assert server.parent_span_id == haproxy_span and server.attributes["vqa.request_id"] == rid
            assert server.resource["service.name"] == "vqa-async"
            assert server.resource["vqa.worker"] == "w0"  # the worker, by its name in the access log
            stages = {s.name for s in in_trace if s.parent_span_id == server.span_id}
            assert {"read upload", "decode", "queue wait", "response"} <= stages, stages
            [batch] = [s for s in in_trace if s.name == "model call"]
            assert batch.attributes["vqa.batch_size"] == 1 and batch.parent_span_id == server.span_id
            assert (batch.trace_id, batch.span_id) in {(t, sp) for t, sp, _ in server.links}

            # A client's own traceparent goes through HAProxy unchanged.
            given = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
            headers = post(cl.url, image2, question2, {"traceparent": given})
            assert headers["traceparent"] == given
            assert line_of(front_log, headers["x-request-id"])["trace_id"] == given[3:35]
            [server] = [s for s in worker_trace(rec, given[3:35]) if s.name == "POST /v1/vqa"]
            assert server.parent_span_id == given[36:52]

            # An invalid one is replaced by a new trace, as if none had come.
            headers = post(cl.url, image3, question3, {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                                       "tracestate": "vendor=x"})
            m = TRACEPARENT.fullmatch(headers["traceparent"])
            assert m and m.group(1) != "0" * 32, headers
            assert line_of(access, headers["x-request-id"])["trace_id"] == m.group(1)
            worker_trace(rec, m.group(1))
        finally:
            stop_cluster(cl)
