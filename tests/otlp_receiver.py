"""An OTLP/HTTP trace receiver for tests: what a collector does at `/v1/traces`, with spans decoded by
`opentelemetry-proto` (the protocol's own message classes), in a thread of its own."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from vqa_async.cluster.supervisor import free_port


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    links: list[tuple[str, str, dict[str, object]]]  # (trace id, span id, attributes)
    resource: dict[str, object]
    status_code: int  # 0 unset, 1 ok, 2 error


def _value(v: object) -> object:
    which = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, which) if which else None


def _attrs(kvs: object) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in kvs}  # type: ignore[attr-defined]


@dataclass
class Receiver:
    url: str  # the traces endpoint: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    spans: list[Span] = field(default_factory=list)
    posts: int = 0
    content_types: set[str] = field(default_factory=set)

    @property
    def base_url(self) -> str:  # OTEL_EXPORTER_OTLP_ENDPOINT (the SDK appends /v1/traces)
        return self.url.removesuffix("/v1/traces")

    def wait_for(self, found: Callable[[list[Span]], bool], timeout: float = 20) -> list[Span]:
        end = time.monotonic() + timeout
        while not found(list(self.spans)):
            assert time.monotonic() < end, f"spans not received in {timeout} s: {[s.name for s in self.spans]}"
            time.sleep(0.1)
        return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def decode(body: bytes) -> list[Span]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                                s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes),
                                [(link.trace_id.hex(), link.span_id.hex(), _attrs(link.attributes))
                                 for link in s.links], resource, s.status.code))
    return out


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    port = free_port()
    rec = Receiver(f"http://127.0.0.1:{port}/v1/traces")

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        rec.content_types.add(request.headers.get("Content-Type", ""))
        rec.posts += 1
        rec.spans.extend(decode(body))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    loop = asyncio.new_event_loop()
    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()
