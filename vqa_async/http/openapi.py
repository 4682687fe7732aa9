"""The OpenAPI 3 description of what the server does: every status and error code it can answer, the headers
that come with them, and the key schemes when `--api-keys` is on. tests/test_contract.py runs a property-based
tester (schemathesis) against a live `serve` with this document; tests/test_http_api.py checks the routes."""

from __future__ import annotations

import itertools
from typing import Any

from vqa_async import __version__
from vqa_async.config import Settings
from vqa_async.http.error_codes import ERRORS, Origin
from vqa_async.http.media_fetch import MAX_URL_CHARS
from vqa_async.http.openapi_chat import chat_request, chat_schemas, openai_error
from vqa_async.http.openapi_v2 import v2_error, v2_paths, v2_schemas
from vqa_async.metrics import SUM_ROUTE, multiprocess_dir
from vqa_async.model.preprocess import FORMAT_NAMES

# Every registered code: one enum for every route (a route answers a subset; which, the responses say).
ERROR_CODES = list(ERRORS)

_STR = {"schema": {"type": "string"}}
REQUEST_ID = {"X-Request-ID": {"description": "the client's own X-Request-ID when it is a token of 1-128 "
                               "characters [A-Za-z0-9._:-], else a fresh one; also error.request_id and in the logs",
                               "required": True, **_STR}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True, **_STR}}
SERVER_TIMING = {"Server-Timing": {"description": "queue, preprocess, compute and total milliseconds", **_STR}}
IMAGE_ID = {"X-Image-Id": {"description": "the answered image's id (the SHA-256 of its bytes): a follow-up question "
                           "sends it as image_id instead of the image", "required": True, **_STR}}


def _answer(description: str, content: dict[str, Any] | None = None, **headers: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "headers": {**REQUEST_ID, **SERVER_TIMING, **headers}}
    if content is not None:
        out["content"] = content
    return out


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


HTML = {"text/html": {"schema": {"type": "string"}}}


def _by_status(*origins: Origin) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in ERRORS.values():
        if e.origin in origins:
            out.setdefault(e.status, []).append(e.code)
    return out


def _described(codes: list[str], content: dict[str, Any], note: str = "") -> dict[str, Any]:
    """A response for these codes (of one status), described from the registry, with Retry-After where any has it."""
    text = "; ".join(f"{c}: {ERRORS[c].meaning}" for c in codes) if len(codes) < 4 else (
        "bad input; error.code says which: " + ", ".join(codes))
    headers = RETRY_AFTER if any(ERRORS[c].retry_after for c in codes) else {}
    extra = {"WWW-Authenticate": {"description": 'Bearer realm="vqa-async"', "required": True, **_STR}} \
        if "unauthorized" in codes else {}
    return _answer(text + note, content, **headers, **extra)


def _errors(settings: Settings, content: dict[str, Any], keys: bool) -> dict[str, Any]:
    """The failures of an answering route, with the body shape `content` (vqa_async/http/error_codes.py)."""
    notes = {408: f" (here {settings.body_timeout_s:g} s)", 504: f" (here {settings.timeout_s:g} s)"}
    return {str(status): _described(codes, content, notes.get(status, ""))
            for status, codes in sorted(_by_status("request", *(("keys",) if keys else ())).items())}


def _one_image_of(schema: dict[str, Any], names: list[str]) -> None:
    """Exactly one of `names` (the image, or what names it): at least one, and no two together. Said with `not`
    rather than `oneOf`, which a generator reads as "any of" and then sends two (400 image_and_image_id)."""
    one = {"anyOf": [{"required": [name]} for name in names]}
    schema["allOf"] = [{"anyOf": schema.pop("anyOf")}, one] if "anyOf" in schema else [one]
    schema["not"] = {"anyOf": [{"required": list(pair)} for pair in itertools.combinations(names, 2)]}


def openapi_spec(settings: Settings) -> dict[str, Any]:
    keys = settings.api_keys is not None
    secured: dict[str, Any] = {"security": [{"bearer": []}, {"apiKey": []}]} if keys else {}
    # Stripped before use: only spaces is refused (empty_question). Anchored: testers read a pattern as a full match.
    not_blank = r"^\s*\S[\s\S]*$"
    question = {"type": "string", "minLength": 1, "maxLength": settings.max_question_chars, "pattern": not_blank}
    # An empty file is refused (empty_image), so a file is at least one byte.
    multipart: dict[str, Any] = {"type": "object", "required": ["image", "question"], "properties": {
        "image": {"type": "string", "format": "binary", "minLength": 1,
                  "description": FORMAT_NAMES + ". Instead of the image, a follow-up may send a previous answer's "
                                 "image_id as a text field (see the JSON body), never both"},
        # A form field is text whatever it looks like ("{}" is a question), and one field or several are one
        # question or several: no type to get wrong, only the bounds of each.
        "question": {"items": {"minLength": 1, "maxLength": settings.max_question_chars, "pattern": not_blank},
                     "minItems": 1, "maxItems": settings.max_questions, "minLength": 1,
                     "maxLength": settings.max_question_chars, "pattern": not_blank,
                     "description": "text; may repeat: one answer each"}}}
    json_body: dict[str, Any] = {"type": "object", "properties": {
        "image": {"type": "string", "format": "byte", "minLength": 1,
                  "description": "base64 (a data: URL is accepted)"},
        "question": question,
        "questions": {"type": "array", "items": question, "minItems": 1, "maxItems": settings.max_questions,
                      "description": "when present, 'question' is ignored"}},
        "anyOf": [{"required": ["question"]}, {"required": ["questions"]}]}
    if settings.media_domains:  # --allowed-media-domains: the image may be named by URL instead
        json_body["properties"]["image_url"] = {
            "type": "string", "format": "uri", "maxLength": MAX_URL_CHARS,
            "description": "instead of 'image': an http(s) URL on one of the allowed hosts: "
                           + ", ".join(sorted(settings.media_domains))}
    # A follow-up names a previous answer's image instead of sending it.
    json_body["properties"]["image_id"] = {
        "type": "string", "pattern": "^[0-9a-fA-F]{64}$",
        "description": "instead of the image: a previous answer's image_id (409 image_not_cached when this server no "
                       "longer holds it). Also accepted as the X-Image-Id header or the image_id query parameter, "
                       "which the cluster's HAProxy routes on"}
    _one_image_of(json_body, [name for name in ("image", "image_url", "image_id") if name in json_body["properties"]])
    body = {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                          "application/json": {"schema": json_body}}}
    page_form = {"type": "object", "required": ["image", "question"], "properties": {
        "image": {**multipart["properties"]["image"], "description": FORMAT_NAMES},
        "question": multipart["properties"]["question"], "api_key": {"type": "string",
                                               "description": "the key, when the server asks for one"}}}
    probe_503 = {"503": _answer("not_alive or not_ready; see error.message", _json("Error"))}
    metrics_401 = {"401": _answer("unauthorized (--metrics-need-key)", _json("Error"))} \
        if keys and settings.metrics_need_key else {}
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "vqa-async", "version": __version__,
                 "description": "Visual question answering with ModelScope's mPLUG, micro-batched. Every answer "
                                "carries X-Request-ID; a valid W3C traceparent is echoed. Every response carries "
                                "Content-Security-Policy, X-Content-Type-Options: nosniff and Referrer-Policy: "
                                "no-referrer. A method a path does not take is 405 method_not_allowed with Allow; an "
                                "unknown path 404 not_found."},
        "paths": {
            "/v1/vqa": {"post": {
                "summary": "Answer questions about an image", **secured, "requestBody": body,
                "responses": {"200": _answer("the answer(s)", _json("Answer"), **IMAGE_ID),
                              **_errors(settings, _json("Error"), keys)}}},
            "/vqa": {"post": {
                "summary": "The deployment tutorial's endpoint (the first question is answered)", **secured,
                "requestBody": body,
                "responses": {"200": _answer("answer", {"application/json": {"schema": {
                    "type": "object", "required": ["status", "answer", "model_used"], "properties": {
                        "status": {"type": "string", "enum": ["success"]}, "answer": {"type": "string"},
                        "model_used": {"type": "string"}}}}}, **IMAGE_ID),
                    **_errors(settings, _json("LegacyError"), keys)}}},
            "/": {"get": {"summary": "The upload page", "responses": {"200": _answer("HTML", HTML)}},
                  "post": {"summary": "The upload page's form post (works without JavaScript); errors are the "
                                      "page with the message", "requestBody": {"required": True, "content": {
                                          "multipart/form-data": {"schema": page_form}}},
                           "responses": {"200": _answer("HTML with the answer", HTML, **IMAGE_ID),
                                         **_errors(settings, {**HTML, **_json("Error")}, keys),
                                         "403": _described(["cross_site"], HTML)}}},
            "/static/page.js": {"get": {"summary": "The upload page's script (shrinks photos before sending them)",
                                        "responses": {"200": _answer("JavaScript", {"text/javascript": {}})}}},
            "/static/page.css": {"get": {"summary": "The upload page's style",
                                         "responses": {"200": _answer("CSS", {"text/css": {}})}}},
            **{path: {"get": {"summary": "Process alive: not stuck in a model call, model thread and batcher "
                                         "running", "responses": {"200": _answer("alive", _json("Status")),
                                                                  **probe_503}}}
               for path in ("/healthz", "/v2/health/live")},  # and KServe v2's name
            **{path: {"get": {"summary": "Model loaded, process alive, and the model not failing every request",
                              "responses": {"200": _answer("ready", _json("Status")), **probe_503}}}
               for path in ("/readyz", "/v2/health/ready")},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible: one image (an image_url part) and the last user message's question",
                **secured, "requestBody": {"required": True, "content": {
                    "application/json": {"schema": chat_request(settings)}}},
                "responses": {"200": _answer("the answer; server-sent events with stream: true", {
                    **_json("ChatCompletion"), "text/event-stream": {"schema": {"type": "string"}}}),
                    **_errors(settings, _json("OpenAIError"), keys)}}},
            "/v1/models": {"get": {"summary": "OpenAI-compatible: the loaded model", **secured, "responses": {
                "200": _answer("a list of one", _json("ModelList")),
                "503": _described(["not_ready"], _json("OpenAIError")),
                **({"401": _errors(settings, _json("OpenAIError"), keys)["401"]} if keys else {})}}},
            **v2_paths(settings, secured, _errors(settings, _json("V2Error"), keys), _answer, _json, IMAGE_ID,
                       RETRY_AFTER),
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 **({"security": secured["security"]} if metrics_401 else {}),
                                 "responses": {"200": _answer("the text format", {"text/plain": _STR}),
                                               **metrics_401}}},
            # Only in a worker of `vqa-async cluster` (vqa_async/metrics.py): the front's /metrics comes here.
            **({SUM_ROUTE: {"get": {"summary": "Prometheus metrics summed over every worker of the cluster",
                                    **({"security": secured["security"]} if metrics_401 else {}),
                                    "responses": {"200": _answer("the text format", {"text/plain": _STR}),
                                                  **metrics_401}}}} if multiprocess_dir() else {}),
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _answer(
                "JSON", {"application/json": {"schema": {"type": "object"}}})}}},
        },
        "components": {"schemas": {
            "Answer": {"type": "object", "required": ["model", "queue_ms", "compute_ms", "batch_size", "image_id"],
                       "properties": {
                           "answer": {"type": "string"}, "answers": {"type": "array", "items": {"type": "string"}},
                           "model": {"type": "string"}, "queue_ms": {"type": "number"},
                           "compute_ms": {"type": "number"},
                           "batch_size": {"type": "integer",
                                          "description": "questions in the model call that answered"},
                           "image_id": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                        "description": "the SHA-256 of the image's bytes (also X-Image-Id): send it "
                                                       "as image_id to ask about the same image again"}}},
            "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
            **chat_schemas(), "OpenAIError": openai_error(ERROR_CODES),
            **v2_schemas(), "V2Error": v2_error(ERROR_CODES),
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string", "enum": ERROR_CODES}, "message": {"type": "string"},
                    "error_id": {"type": "string", "description": "an unexpected failure's id in the log"},
                    "request_id": {"type": "string", "description": "the X-Request-ID of this request"}}}}},
            "LegacyError": {"type": "object", "required": ["status", "message", "code"], "properties": {
                "status": {"type": "string", "enum": ["error"]}, "message": {"type": "string"},
                "code": {"type": "string", "enum": ERROR_CODES}, "request_id": {"type": "string"}}},
        }},
    }
    if keys:
        spec["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    return spec
