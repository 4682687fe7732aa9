"""What the request path calls to trace a request: no-ops (one function call each) until `start_from_env()`
finds an OTLP endpoint in the environment and installs the SDK's side (`live.py`).

Nothing here imports OpenTelemetry: with tracing off, the SDK is not imported at all (tests/test_tracing.py
checks it on a real `serve`). The spans (docs/tracing.md): a server span per request, continuing a W3C
`traceparent` if one came in; under it `read upload`, `decode`, `queue wait` and `response`; and one `model call`
span per batch, linked from every request it answered and linking to each of them, with the batch's size.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Either turns tracing on (the SDK's own variables: the second one appends /v1/traces, the first does not).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL_HINT = "pip install 'vqa-async[otel]'"

_OFF: AbstractContextManager[Any] = contextlib.nullcontext()


class RequestSpan(Protocol):
    """A request's server span, as the HTTP middleware sees it."""

    @property
    def trace_id(self) -> str: ...  # 32 hex digits: the access log's `trace_id`

    def finish(self, status: int) -> None: ...  # the response's status: attribute, and error status on 5xx


class Tracing(Protocol):
    """The SDK's side (`live.LiveTracing`); every method is called only while tracing is on."""

    def request(self, name: str, headers: Mapping[str, str],
                attributes: dict[str, Any]) -> AbstractContextManager[RequestSpan]: ...

    def span(self, name: str) -> AbstractContextManager[Any]: ...

    def traced(self, name: str, awaitable: Awaitable[T]) -> Awaitable[T]: ...

    def current(self) -> object | None: ...

    def batch(self, items: Sequence[Any], size: int) -> AbstractContextManager[object | None]: ...

    def waited(self, enqueued_at: float, started_at: float, batch: object | None, size: int) -> None: ...

    def shutdown(self) -> None: ...


_tracing: Tracing | None = None


def active() -> Tracing | None:
    """The SDK's side while tracing is on, else None."""
    return _tracing


def span(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one around a block (a shared no-op context while off)."""
    return _OFF if _tracing is None else _tracing.span(name)


def traced(name: str, awaitable: Awaitable[T]) -> Awaitable[T]:
    """`await traced("decode", x)`: a child span around awaiting `x`; `x` itself while off."""
    return awaitable if _tracing is None else _tracing.traced(name, awaitable)


def current() -> object | None:
    """The current span's context, for a request's WorkItem (`trace`): what the batch span links to."""
    return None if _tracing is None else _tracing.current()


def batch(items: Sequence[Any], size: int) -> AbstractContextManager[object | None]:
    """Around one model call on the model thread: the `model call` span, its parent the first traced request
    of `items` (objects with a `trace` attribute, as `current()` gave), linking to each of them. Yields that
    span's context (None while off or when none of the requests is sampled), for `Done.trace`."""
    return _OFF if _tracing is None else _tracing.batch(items, size)


def waited(enqueued_at: float, started_at: float, batch: object | None, size: int) -> None:
    """A request was answered: its `queue wait` span (time.monotonic() values) and its link to the batch span."""
    if _tracing is not None:
        _tracing.waited(enqueued_at, started_at, batch, size)


def install(tracing: Tracing | None) -> None:
    """Turns tracing on with `tracing`, or off with None (tests; `start_from_env` for a server)."""
    global _tracing
    _tracing = tracing


def configured_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """The variable that turns tracing on, if one is set."""
    return next((v for v in ENDPOINT_VARIABLES if environ.get(v, "").strip()), None)


def start_from_env(worker: str | None = None) -> bool:
    """Turns tracing on if `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (the SDK
    then reads every other `OTEL_*` variable itself: service name, resource attributes, sampler, headers, batch
    processor...). Says so in the log at start, and says loudly when the variable is set but the SDK is missing
    (the server still serves: traces are not worth an outage). `worker`: the process's name, as
    `service.instance.id` unless the environment sets one."""
    var = configured_endpoint()
    if var is None:
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.info("tracing off: OTEL_SDK_DISABLED=true, although %s is set", var)
        return False
    try:
        from vqa_async.otel.live import LiveTracing
    except ImportError as e:
        log.error("%s is set, but the OpenTelemetry SDK cannot be imported (%s): NO TRACES will be sent. "
                  "Install it: %s", var, e, INSTALL_HINT)
        return False
    tracing = LiveTracing.from_env(worker)
    install(tracing)
    log.info("tracing on: OTLP/HTTP spans to %s (%s), service %s", os.environ[var].strip(), var,
             tracing.service_name)
    return True
