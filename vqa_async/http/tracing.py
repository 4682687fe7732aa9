"""Request IDs, W3C trace context, Server-Timing and the access log: what ties a client's report to our logs.

Every response carries `X-Request-ID`: the client's own (or the front's) when it is a sane token, else a fresh
one. The id is in a context variable for the request's task, so that every log line written while serving it
carries it (`RequestIdFilter`), and `errors.error_body` puts it into every error body. A valid `traceparent`
is kept, logged and echoed; an invalid one is dropped (a malformed header must not reach our logs verbatim).
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Callable

from aiohttp import web

from vqa_async.http.context import OUTCOME

CURRENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("vqa_request_id", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# version 00: trace-id (32 hex, not all zero) - parent-id (16 hex, not all zero) - flags (2 hex)
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

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
