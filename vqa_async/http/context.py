"""What the middlewares learn about a request, for the handlers and the access log (typed request keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # the HAProxy renderer imports errors.py, hence this module: no model stack at run time
    from vqa_async.core.service import Outcome


@dataclass(frozen=True)
class Client:
    """Who asks: an API key's name (with its weight), or an address when no keys are configured."""

    name: str
    weight: int = 1
    # With API keys, the secret that makes this key's image ids its own (core/image_ids.py); empty without keys.
    scope: bytes = field(default=b"", repr=False, compare=False)


REQUEST_ID = web.RequestKey("request_id", str)
TRACEPARENT = web.RequestKey("traceparent", str)  # set only when the client sent a valid one
TRACE_ID = web.RequestKey("trace_id", str)  # the request's trace: the traceparent's, or the span's when tracing
CLIENT = web.RequestKey("client", Client)  # absent on an open route when keys are on
OUTCOME: web.RequestKey[Outcome] = web.RequestKey("outcome")  # the service's timings, once answered
QUESTIONS = web.RequestKey("questions", int)
ERROR_CODE = web.RequestKey("error_code", str)
