"""The OpenAPI 3 description of what the server does (tests check it against the app's routes)."""

from __future__ import annotations

from typing import Any

from vqa_async import __version__
from vqa_async.config import Settings

ERROR_CODES = ["missing_image", "missing_question", "empty_image", "invalid_image", "unsupported_image_format",
               "image_too_large", "body_too_large", "empty_question", "question_too_long", "too_many_questions",
               "invalid_json", "invalid_base64", "invalid_field", "invalid_multipart", "invalid_utf8",
               "unsupported_media_type", "overloaded", "not_ready", "timeout", "model_error", "internal_error",
               "not_found", "method_not_allowed", "too_many_parts", "request_timeout", "not_alive"]


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_spec(settings: Settings) -> dict[str, Any]:
    errors = {"400": _error("bad input (see error.code)"),
              "408": _error(f"the body did not arrive within {settings.body_timeout_s:g} s"),
              "413": _error("body or image too large"),
              "415": _error("wrong content type"), "500": _error("the model failed on this request"),
              "503": _error("overloaded or not ready; retry after Retry-After seconds"),
              "504": _error(f"no answer within {settings.timeout_s:g} s")}
    multipart = {"type": "object", "required": ["image", "question"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, GIF, BMP, WEBP or TIFF"},
        "question": {"type": "array", "items": {"type": "string", "maxLength": settings.max_question_chars},
                     "maxItems": settings.max_questions, "description": "may repeat: one answer each"}}}
    json_body = {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "byte", "description": "base64 (a data: URL is accepted)"},
        "question": {"type": "string", "maxLength": settings.max_question_chars},
        "questions": {"type": "array", "items": {"type": "string"}, "maxItems": settings.max_questions}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "vqa-async", "version": __version__,
                 "description": "Visual question answering with ModelScope's mPLUG, micro-batched."},
        "paths": {
            "/v1/vqa": {"post": {
                "summary": "Answer questions about an image",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                                              "application/json": {"schema": json_body}}},
                "responses": {"200": {"description": "the answer(s)", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Answer"}}}}, **errors}}},
            "/vqa": {"post": {
                "summary": "The deployment tutorial's endpoint (one question)",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart}}},
                "responses": {"200": {"description": "answer", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"status": {"type": "string", "enum": ["success"]},
                                                     "answer": {"type": "string"},
                                                     "model_used": {"type": "string"}}}}}},
                    "400": {"description": "{status: error, message, code}"}}}},
            "/": {"get": {"summary": "The upload page", "responses": {"200": {"description": "HTML"}}},
                  "post": {"summary": "The upload page's form post (works without JavaScript)",
                           "responses": {"200": {"description": "HTML with the answer"}}}},
            "/static/page.js": {"get": {"summary": "The upload page's script (shrinks photos before sending them)",
                                        "responses": {"200": {"description": "JavaScript"}}}},
            "/healthz": {"get": {"summary": "Process alive: not stuck in a model call, model thread and batcher "
                                            "running", "responses": {"200": {"description": "alive"},
                                                                     "503": _error("needs a restart")}}},
            "/readyz": {"get": {"summary": "Model loaded, process alive, and the model not failing every request",
                                "responses": {"200": {"description": "ready"}, "503": _error("not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "JSON"}}}},
        },
        "components": {"schemas": {
            "Answer": {"type": "object", "properties": {
                "answer": {"type": "string"}, "answers": {"type": "array", "items": {"type": "string"}},
                "model": {"type": "string"}, "queue_ms": {"type": "number"}, "compute_ms": {"type": "number"},
                "batch_size": {"type": "integer", "description": "questions in the model call that answered"}}},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string", "enum": ERROR_CODES}, "message": {"type": "string"},
                    "error_id": {"type": "string"}}}}}}},
    }
