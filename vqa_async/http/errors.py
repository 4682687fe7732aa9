"""Errors as JSON: `{"error": {"code": "<stable_code>", "message": "<what to fix>"}}`, never a stack trace."""

from __future__ import annotations

import logging
import uuid

import orjson
from aiohttp import web

from vqa_async.http.error_codes import STATUS_CODES, status_of
from vqa_async.http.tracing import current_request_id

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, where one is (OpenAI's error shape names it)


def refuse(code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None) -> ApiError:
    """The error for a registered code (vqa_async/http/error_codes.py), with the status registered for it."""
    return ApiError(status_of(code), code, message, headers, param)


def error_body(code: str, message: str, error_id: str | None = None,
               request_id: str | None = None) -> dict[str, dict[str, str]]:
    """The error shape. Inside a request, `request_id` defaults to that request's id (X-Request-ID)."""
    err = {"code": code, "message": message}
    if error_id:
        err["error_id"] = error_id
    if request_id := request_id or current_request_id():
        err["request_id"] = request_id
    return {"error": err}


# OpenAI's error `type` by status (its API's own values); our stable code goes into `code`.
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                      429: "rate_limit_error"}


def uses_openai_shape(path: str) -> bool:
    """The OpenAI-compatible routes (vqa_async/http/openai_api.py) answer errors in OpenAI's shape."""
    return path in ("/v1/chat/completions", "/v1/models")


def openai_error_body(err: ApiError, error_id: str | None = None) -> dict[str, dict[str, object]]:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI's API and SDK have it, plus our
    `request_id` (and `error_id` for an unexpected failure)."""
    kind = OPENAI_ERROR_TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
    body: dict[str, object] = {"message": err.message, "type": kind, "param": err.param, "code": err.code}
    if error_id:
        body["error_id"] = error_id
    if request_id := current_request_id():
        body["request_id"] = request_id
    return {"error": body}


def uses_v2_shape(path: str) -> bool:
    """The Open Inference Protocol's routes (vqa_async/http/open_inference.py) answer errors in its shape."""
    return path == "/v2" or path.startswith("/v2/models/")


def v2_error_body(err: ApiError, error_id: str | None = None) -> dict[str, str]:
    """`{"error": "<message>"}` as the protocol (and tritonclient, KServe's SDK) has it, with our stable `code`
    and the `request_id` (and `error_id` for an unexpected failure) beside it."""
    body = {"error": err.message, "code": err.code}
    if error_id:
        body["error_id"] = error_id
    if request_id := current_request_id():
        body["request_id"] = request_id
    return body


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def to_api_error(e: BaseException) -> ApiError:
    """Any exception as the error a client sees. Unexpected ones are logged with an id the response carries."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, web.HTTPException):
        if e.status == 413:
            return refuse("body_too_large", f"the request body is larger than allowed: {e.text or e.reason}")
        err = ApiError(e.status, STATUS_CODES.get(e.status, f"http_{e.status}"), e.reason)
        if isinstance(e, web.HTTPMethodNotAllowed):  # RFC 9110: a 405 says which methods the resource takes
            err.headers["Allow"] = ", ".join(sorted(e.allowed_methods))
        return err
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error [error id %s]", error_id, exc_info=e)
    return refuse("internal_error", f"something went wrong on our side; error id {error_id}",
                  {"X-Error-Id": error_id})
