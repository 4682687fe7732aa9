"""Request IDs, W3C trace context, Server-Timing and the access log: what ties a client's report to our logs.

Every response carries `X-Request-ID`: the client's own (or the front's) when it is a sane token, else a fresh
one. The id is in a context variable for the request's task, so that every log line written while serving it
carries it (`RequestIdFilter`), and `errors.error_body` puts it into every error body. A valid `traceparent`
is kept, logged and echoed; an invalid one is dropped (a malformed header must not reach our logs verbatim).
Its trace id is the access log's `trace_id`. With OpenTelemetry tracing on (vqa_async/otel, docs/tracing.md) each
request is also a server span continuing that traceparent (or starting a trace), whose id the log then carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from vqa_async.http.accesslog import PROBES
from vqa_async.http.context import OUTCOME, REQUEST_ID, TRACE_ID, TRACEPARENT
from vqa_async.otel import hooks

CURRENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("vqa_request_id", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# version 00: trace-id (32 hex, not all zero) - parent-id (16 hex, not all zero) - flags (2 hex)
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Called once per request when it ends: (request, status, latency_s)
Finisher = Callable[[web.Request, int, float], None]


def current_request_id() -> str | None:
    return CURRENT_ID.get()


def request_id_from(header: str | None) -> str:
    if header is not None and _SANE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def traceparent_from(header: str | None) -> str | None:
    if header is None:
        return None
    header = header.strip().lower()
    return header if _TRACEPARENT.fullmatch(header) else None


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` ("-" outside a request) so that a log format can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = CURRENT_ID.get() or "-"
        return True


def setup_logging(level: str = "INFO") -> None:
    """The log format of every process: `rid` is the X-Request-ID of the request being served ("-" outside one),
    so that a client's report finds its lines."""
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] rid=%(request_id)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


def server_timing(request: web.Request, latency_s: float) -> str:
    parts = []
    if (out := request.get(OUTCOME)) is not None:
        parts = [f"queue;dur={out.queue_ms}", f"preprocess;dur={out.preprocess_ms}", f"compute;dur={out.compute_ms}"]
    parts.append(f"total;dur={latency_s * 1000:.2f}")
    return ", ".join(parts)


def tracing_middleware(finish: Finisher, probes: frozenset[str] = PROBES) -> Middleware:
    """The outermost middleware: sets the request's id first and sees its final status last. With tracing on,
    every request but the `probes` (health checks, several a second) is a server span around all of it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.monotonic()
        rid = request_id_from(request.headers.get("X-Request-ID"))
        request[REQUEST_ID] = rid
        if tp := traceparent_from(request.headers.get("traceparent")):
            request[TRACEPARENT] = tp
            request[TRACE_ID] = tp[3:35]
        if (tracing := hooks.active()) is not None and request.path not in probes:
            resource = request.match_info.route.resource
            # OpenTelemetry's HTTP conventions: "METHOD route", or the method alone when no route matched.
            name, attributes = request.method, {"http.request.method": request.method, "url.path": request.path,
                                                "vqa.request_id": rid}
            if resource is not None:
                name, attributes["http.route"] = f"{request.method} {resource.canonical}", resource.canonical
            with tracing.request(name, request.headers, attributes) as span:
                request[TRACE_ID] = span.trace_id
                return await serve(request, handler, finish, t0, tp, span)
        return await serve(request, handler, finish, t0, tp, None)

    return middleware


async def serve(request: web.Request, handler: Handler, finish: Finisher, t0: float, tp: str | None,
                span: hooks.RequestSpan | None) -> web.StreamResponse:
    resp = await handle(request, handler, finish, t0, tp, span)
    if span is not None:
        await send(request, resp)
    return resp


async def handle(request: web.Request, handler: Handler, finish: Finisher, t0: float, tp: str | None,
                 span: hooks.RequestSpan | None) -> web.StreamResponse:
    """Runs the request, and tells its final status to the access log (`finish`) and its span, if traced; the
    log line is written before the response, traced or not."""
    token = CURRENT_ID.set(request[REQUEST_ID])
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        resp.headers["X-Request-ID"] = request[REQUEST_ID]
        if tp:
            resp.headers["traceparent"] = tp
        resp.headers["Server-Timing"] = server_timing(request, time.monotonic() - t0)
        return resp
    except web.HTTPException as e:  # redirects and the like: the error middleware answers the rest
        status = e.status
        e.headers["X-Request-ID"] = request[REQUEST_ID]
        raise
    except asyncio.CancelledError:
        status = 499  # the client left
        raise
    finally:
        if span is not None:
            span.finish(status)
        finish(request, status, time.monotonic() - t0)
        CURRENT_ID.reset(token)


async def send(request: web.Request, resp: web.StreamResponse) -> None:
    """Writes the response here, inside the request's span, so that its `response` span times the write (aiohttp
    would write it after the middlewares). A client gone meanwhile: aiohttp's own write, which follows and finds
    nothing left to do, meets the closed connection as it would have."""
    with contextlib.suppress(ConnectionError), hooks.span("response"):
        await resp.prepare(request)
        await resp.write_eof()
