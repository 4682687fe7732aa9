"""The SDK's side of tracing: a TracerProvider configured by the SDK from the `OTEL_*` variables, an OTLP/HTTP
exporter in the SDK's batch processor (its own thread: nothing is sent from the event loop), and the spans of
`hooks.py`. Imported only when tracing is on."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

T = TypeVar("T")

SCOPE = "vqa_async"
_NOTHING: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()


def _offset_ns() -> int:
    """time.monotonic() -> nanoseconds since the epoch (span times): what to add."""
    return time.time_ns() - time.monotonic_ns()


class LiveRequestSpan:
    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.trace_id = format(span.get_span_context().trace_id, "032x")

    def finish(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a server span's 4xx is the client's error (OpenTelemetry's HTTP conventions)
            self.span.set_status(Status(StatusCode.ERROR))


class LiveTracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE)
        self.service_name = str(provider.resource.attributes.get("service.name", "?"))

    @classmethod
    def from_env(cls, worker: str | None = None, processor: SpanProcessor | None = None) -> LiveTracing:
        """The SDK reads its variables itself: the resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), the
        sampler (OTEL_TRACES_SAMPLER, default parentbased_always_on), the exporter (OTEL_EXPORTER_OTLP_*: endpoint,
        headers, timeout, compression, certificates), the batch processor (OTEL_BSP_*). Only where the
        environment names no service do we name it `vqa-async`; `vqa.worker` is the process's name in the access
        log (a cluster's w0, w1...; else its pid), `host.name` the machine's."""
        resource = Resource.create()
        extra: dict[str, str] = {"vqa.worker": worker or str(os.getpid())}
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            extra["service.name"] = "vqa-async"
        if "host.name" not in resource.attributes:
            extra["host.name"] = socket.gethostname()
        provider = TracerProvider(resource=resource.merge(Resource(extra)))
        provider.add_span_processor(processor or BatchSpanProcessor(OTLPSpanExporter()))
        # Global too, so that any library the process uses with OpenTelemetry's API lands in the same traces.
        trace.set_tracer_provider(provider)
        return cls(provider)

    @classmethod
    def exporting_to(cls, exporter: SpanExporter) -> LiveTracing:
        """A provider of its own with the default sampler, exporting at once (tests)."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "vqa-async"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider)

    @contextlib.contextmanager
    def request(self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> Iterator[LiveRequestSpan]:
        parent = propagate.extract(headers)  # W3C traceparent/tracestate (or OTEL_PROPAGATORS' choice)
        with self.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                                               record_exception=False, set_status_on_exception=False) as span:
            yield LiveRequestSpan(span)

    # A request that the sampler dropped (most, under a ratio sampler) gets no child spans at all: they would be
    # dropped too, at a cost per request several times that of the check.
    def span(self, name: str) -> contextlib.AbstractContextManager[Any]:
        if not trace.get_current_span().is_recording():
            return _NOTHING
        return self.tracer.start_as_current_span(name)

    async def _traced(self, name: str, awaitable: Awaitable[T]) -> T:
        with self.tracer.start_as_current_span(name):
            return await awaitable

    def traced(self, name: str, awaitable: Awaitable[T]) -> Awaitable[T]:
        if not trace.get_current_span().is_recording():
            return awaitable
        return self._traced(name, awaitable)

    def current(self) -> object | None:
        ctx = trace.get_current_span().get_span_context()
        return ctx if ctx.is_valid else None

    @contextlib.contextmanager
    def batch(self, items: Sequence[Any], size: int) -> Iterator[object | None]:
        traced = [c for item in items if isinstance(c := item.trace, SpanContext) and c.trace_flags.sampled]
        if not traced:
            yield None
            return
        # A span has one parent: the first traced request's; a batch answers several, so it links to each.
        parent = trace.set_span_in_context(NonRecordingSpan(traced[0]))
        span = self.tracer.start_span("model call", context=parent, links=[Link(c) for c in traced],
                                      attributes={"vqa.batch_size": size, "vqa.batch_requests": len(items)})
        try:
            yield span.get_span_context()
        except BaseException as e:  # the runner splits a failed batch and retries: each try is a span
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise
        finally:
            span.end()

    def waited(self, enqueued_at: float, started_at: float, batch: object | None, size: int) -> None:
        request = trace.get_current_span()
        if not request.is_recording():
            return
        offset = _offset_ns()
        self.tracer.start_span("queue wait", start_time=int(enqueued_at * 1e9) + offset).end(
            end_time=int(started_at * 1e9) + offset)
        request.set_attribute("vqa.batch_size", size)
        if isinstance(batch, SpanContext):
            request.add_link(batch, {"vqa.batch_size": size})

    def shutdown(self) -> None:
        self.provider.shutdown()
