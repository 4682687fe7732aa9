"""Reading a VQA request: multipart (`image` file, `question` repeated) or JSON (`image` base64, `question` or
`questions`). Every way it can be wrong is an ApiError with a stable code."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import MultiDictProxy

from vqa_async.config import Settings
from vqa_async.http.errors import ApiError


@dataclass(frozen=True)
class VqaInput:
    image: bytes
    questions: list[str]
    plural: bool  # answer as {"answers": [...]} rather than {"answer": ...}


def bad(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


async def read_vqa_input(request: web.Request, settings: Settings) -> VqaInput:
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise bad("body_too_large", f"the request body is {request.content_length} bytes; the limit is "
                  f"{settings.max_body_bytes} (--max-body-mb {settings.max_body_mb:g})", 413)
    ctype = request.content_type
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _from_multipart(request, settings)
    if ctype == "application/json":
        return await _from_json(request, settings)
    raise bad("unsupported_media_type", f"send multipart/form-data or application/json, not {ctype or 'nothing'}",
              415)


async def _from_multipart(request: web.Request, settings: Settings) -> VqaInput:
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise
    except UnicodeDecodeError as e:
        raise bad("invalid_utf8", "a form field is not valid UTF-8") from e
    except ValueError as e:  # malformed multipart
        raise bad("invalid_multipart", f"the multipart body cannot be read: {e}") from e
    try:
        return _read_form(form, settings)
    finally:  # aiohttp spools uploads to temporary files: close them whatever happened
        for value in form.values():
            if isinstance(value, web.FileField):
                value.file.close()


def _read_form(form: MultiDictProxy[str | bytes | bytearray | web.FileField], settings: Settings) -> VqaInput:
    image = form.get("image")
    if image is None:
        raise bad("missing_image", "add the picture as a file field named 'image'")
    if isinstance(image, web.FileField):
        data = image.file.read()
    elif isinstance(image, str | bytes):
        raise bad("missing_image", "the 'image' field must be a file upload, not text")
    else:  # pragma: no cover - aiohttp yields only these types
        raise bad("missing_image", "unreadable 'image' field")
    questions: list[str] = []
    for q in list(form.getall("question", [])) + list(form.getall("questions", [])):
        if isinstance(q, web.FileField):
            raise bad("invalid_field", "'question' must be text, not a file")
        try:
            questions.append(q if isinstance(q, str) else bytes(q).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise bad("invalid_utf8", "the question is not valid UTF-8") from e
    return VqaInput(data, check_questions(questions, settings), plural=len(questions) > 1)


async def _from_json(request: web.Request, settings: Settings) -> VqaInput:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if "utf-8" in str(e).lower():
            raise bad("invalid_utf8", "the JSON body is not valid UTF-8") from e
        raise bad("invalid_json", f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise bad("invalid_json", "the JSON body must be an object with 'image' and 'question' or 'questions'")
    image_b64 = body.get("image")
    if not image_b64:
        raise bad("missing_image", "add the picture as base64 in the field 'image'")
    if not isinstance(image_b64, str):
        raise bad("invalid_base64", "'image' must be a base64 string")
    if image_b64.startswith("data:") and "," in image_b64:  # a data URL from a browser
        image_b64 = image_b64.split(",", 1)[1]
    try:
        data = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad("invalid_base64", "'image' is not valid base64") from e
    if "questions" in body:
        qs = body["questions"]
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise bad("invalid_field", "'questions' must be a list of strings")
        return VqaInput(data, check_questions(qs, settings), plural=True)
    q = body.get("question")
    if q is not None and not isinstance(q, str):
        raise bad("invalid_field", "'question' must be a string")
    return VqaInput(data, check_questions([q] if q is not None else [], settings), plural=False)


def check_questions(questions: list[str], settings: Settings) -> list[str]:
    if not questions:
        raise bad("missing_question", "ask something: add a 'question' field")
    if len(questions) > settings.max_questions:
        raise bad("too_many_questions", f"{len(questions)} questions; at most {settings.max_questions} per request")
    out = []
    for q in questions:
        q = q.strip()
        if not q:
            raise bad("empty_question", "a question is empty")
        if len(q) > settings.max_question_chars:
            raise bad("question_too_long", f"a question has {len(q)} characters; at most "
                      f"{settings.max_question_chars}")
        out.append(q)
    return out
