"""Every stable error code a client can get, once: its HTTP status and what it means.

The handlers raise from it (`errors.refuse(code, message)` takes the status from here), the OpenAPI document lists
it, `docs/errors.md` is printed from it (`python -m vqa_async.tools.docs errors`), and tests/test_reference.py
fails on a code raised anywhere in vqa_async that is not here. A code is a contract: rename none, add freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Where a code can come from, which decides the OpenAPI responses it is listed under:
#   request: an answering route (/v1/vqa, /vqa, the page's form, /v1/chat/completions)
#   keys: any route that asks for a key (--api-keys)     page: the page's form post only
#   probe: /healthz and /readyz                           any: any path (routing)
#   front: the cluster's HAProxy answers it itself (vqa_async/cluster/haproxy.py)
Origin = Literal["request", "keys", "page", "probe", "any", "front"]


@dataclass(frozen=True)
class ErrorCode:
    code: str
    status: int
    meaning: str
    origin: Origin = "request"
    http_default: bool = False  # the code aiohttp's own error of this status (routing, body size) is given
    retry_after: bool = False  # answered with Retry-After


def _codes(*codes: ErrorCode) -> dict[str, ErrorCode]:
    out = {c.code: c for c in codes}
    assert len(out) == len(codes), "a code is registered twice"
    return out


_IMAGE = "the image_url could not be used: "
ERRORS = _codes(
    # -- the request's body ---------------------------------------------------------------------------------------
    ErrorCode("bad_request", 400, "the request is malformed (HTTP itself, before any route reads it)", "any",
              http_default=True),
    ErrorCode("missing_image", 400, "no image: add a file field named `image` (or base64 `image`, `image_url`, "
              "`image_id`; on chat, an image_url part)"),
    ErrorCode("missing_question", 400, "no question: add a `question` field (on chat, a text part in the last user "
              "message)"),
    ErrorCode("empty_image", 400, "the image file is empty"),
    ErrorCode("invalid_image", 400, "not an image, or a damaged or truncated one"),
    ErrorCode("unsupported_image_format", 400, "an image, but not JPEG, PNG, GIF, BMP, WEBP, TIFF, HEIC/HEIF or AVIF"),
    ErrorCode("empty_question", 400, "a question is blank"),
    ErrorCode("question_too_long", 400, "a question is longer than `--max-question-chars`"),
    ErrorCode("too_many_questions", 400, "more questions than `--max-questions` in one request"),
    ErrorCode("invalid_json", 400, "the body is not JSON, or not an object"),
    ErrorCode("invalid_base64", 400, "`image` is not valid base64"),
    ErrorCode("invalid_field", 400, "a field has the wrong type, or two fields that exclude each other are both "
              "there (`image` and `image_url`)"),
    ErrorCode("invalid_multipart", 400, "the multipart body cannot be read, or is nested"),
    ErrorCode("invalid_utf8", 400, "a question or the JSON body is not UTF-8"),
    ErrorCode("too_many_parts", 400, "a form with more than `--max-form-parts` parts: refused at the bound, nothing "
              "after it is parsed"),
    ErrorCode("invalid_image_id", 400, "`image_id` is not 64 hex characters, or the request names two different "
              "images"),
    ErrorCode("image_and_image_id", 400, "an image and an `image_id` in one request: send one"),
    # -- image URLs (vqa_async/http/media_fetch.py; --allowed-media-domains) -------------------------------------
    ErrorCode("image_url_invalid", 400, _IMAGE + "not a string, not http(s) (or a base64 data: URL on chat), no "
              "host, a user:password in it, or over 4,096 characters"),
    ErrorCode("image_url_not_allowed", 400, _IMAGE + "its host (or a redirect's) is not one of "
              "`--allowed-media-domains`, exactly; or none is set"),
    ErrorCode("image_url_address_refused", 400, _IMAGE + "the name resolves to a loopback, private, link-local, "
              "multicast, reserved or cloud-metadata address (`--allow-private-media` allows private and loopback "
              "ones)"),
    ErrorCode("image_url_too_many_redirects", 400, _IMAGE + "more than 3 redirects"),
    ErrorCode("image_url_timeout", 400, _IMAGE + "not connected within `--media-connect-timeout-s` or not fetched "
              "whole within `--media-timeout-s`"),
    ErrorCode("image_url_too_large", 400, _IMAGE + "larger than `--max-body-mb`"),
    ErrorCode("image_url_fetch_failed", 400, _IMAGE + "anything else: connection refused, TLS, a status other than "
              "2xx, an encoded body"),
    # -- /v1/chat/completions (vqa_async/http/openai_api.py) ------------------------------------------------------
    ErrorCode("too_many_images", 400, "the conversation holds more than one image"),
    ErrorCode("unsupported_parameter", 400, "a parameter this model cannot honour: `n` > 1, tools, tool_choice, "
              "functions, function_call, logprobs"),
    ErrorCode("unsupported_content", 400, "a content part other than text and image_url"),
    # -- who may ask ----------------------------------------------------------------------------------------------
    ErrorCode("unauthorized", 401, "with `--api-keys`: no key, or not a valid one (`WWW-Authenticate: Bearer "
              "realm=\"vqa-async\"`)", "keys", http_default=True),
    ErrorCode("cross_site", 403, "the page's form was posted from another site's page (`Sec-Fetch-Site`, else "
              "`Origin` against `Host`)", "page"),
    ErrorCode("not_found", 404, "no such path", "any", http_default=True),
    ErrorCode("method_not_allowed", 405, "the path does not take this method (`Allow` says which it takes)", "any",
              http_default=True),
    ErrorCode("request_timeout", 408, "the body did not arrive within `--body-timeout-s`"),
    ErrorCode("image_not_cached", 409, "a follow-up's `image_id` names an image this server does not hold "
              "(evicted, restarted since, or never seen): send the image again"),
    ErrorCode("body_too_large", 413, "the body is larger than `--max-body-mb`", http_default=True),
    ErrorCode("image_too_large", 413, "the image has more pixels than `--max-pixels` (refused before decoding)"),
    ErrorCode("unsupported_media_type", 415, "send multipart/form-data or application/json", http_default=True),
    ErrorCode("too_many_requests", 429, "this client has `--max-inflight-per-client` requests being answered; "
              "through `vqa-async cluster`, also HAProxy's per-client limits (`--rate-limit`, "
              "`--rate-limit-per-source`, `--max-conn-per-source`)", http_default=True, retry_after=True),
    # -- the server's side ----------------------------------------------------------------------------------------
    ErrorCode("model_error", 500, "this request failed in the model (the others in its batch were answered)"),
    ErrorCode("internal_error", 500, "something unexpected; `error_id` names it in the server's log"),
    ErrorCode("bad_gateway", 502, "a worker answered with something that is not HTTP", "front"),
    ErrorCode("overloaded", 503, "the queue (counting uploads still being decoded) is full, or the process has "
              "`--max-connections` open; through the cluster, no worker took it within `--queue-timeout-s`",
              retry_after=True),
    ErrorCode("not_ready", 503, "the model is loading, or failing every request here (also `/readyz`)",
              http_default=True, retry_after=True),
    ErrorCode("not_alive", 503, "`/healthz`: the process is stuck in a model call or lost its model thread or "
              "batcher", "probe"),
    ErrorCode("timeout", 504, "no answer within `--timeout-s`"),
)

# aiohttp's own HTTP errors (routing, body size) get the code registered for their status.
STATUS_CODES = {e.status: e.code for e in ERRORS.values() if e.http_default}


def status_of(code: str) -> int:
    """The status a code is answered with; KeyError for a code nobody registered."""
    return ERRORS[code].status


def codes_for(*origins: Origin) -> list[str]:
    return [e.code for e in ERRORS.values() if e.origin in origins]


def errors_page() -> str:
    """docs/errors.md: the registry as a table, by status."""
    lines = ["# Error codes", "",
             "<!-- Generated by `python -m vqa_async.tools.docs errors` from vqa_async/http/error_codes.py; "
             "tests/test_reference.py fails when this page differs. Do not edit. -->", "",
             'Every error answers `{"error": {"code": "<code>", "message": "<what to fix>", "request_id": "..."}}` '
             "(an unexpected failure also carries `error_id`, the id in the server's log). `/vqa` answers "
             '`{"status": "error", "message", "code", "request_id"}`; `/v1/chat/completions` and `/v1/models` '
             "answer the same codes in OpenAI's error shape (`message`, `type`, `param`, `code`). Codes are stable: "
             "a client may branch on them.", "",
             "| status | code | meaning |", "| --- | --- | --- |"]
    for e in sorted(ERRORS.values(), key=lambda e: e.status):
        extra = " Comes with `Retry-After`." if e.retry_after else ""
        where = {"front": " (`vqa-async cluster`'s HAProxy)", "page": " (the page's form post)",
                 "probe": " (health probe)"}.get(e.origin, "")
        lines.append(f"| {e.status} | `{e.code}` | {e.meaning}{where}.{extra} |")
    return "\n".join(lines) + "\n"
