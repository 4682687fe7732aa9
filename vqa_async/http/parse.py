"""Reading a VQA request: multipart (`image` file, `question` repeated) or JSON (`image` base64, `question` or
`questions`). Every way it can be wrong is an ApiError with a stable code."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError  # a part's malformed header (InvalidHeader)

from vqa_async.config import Settings
from vqa_async.http.errors import ApiError
from vqa_async.http.media_fetch import fetch_image
from vqa_async.otel import hooks

T = TypeVar("T")


@dataclass(frozen=True)
class VqaInput:
    image: bytes
    questions: list[str]
    plural: bool  # answer as {"answers": [...]} rather than {"answer": ...}
    api_key: str | None = None  # the page's no-JavaScript form sends its key as a field
    image_url: str | None = None  # JSON's `image_url`: read_vqa_input fetches it into `image`
    image_id: str | None = None  # a follow-up names a previous answer's image instead of sending it (`image` empty)


def bad(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


async def read_vqa_input(request: web.Request, settings: Settings) -> VqaInput:
    check_length(request, settings)
    ctype = media_type(request)
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        read = _from_multipart
    elif ctype == "application/json":
        read = _from_json
    else:
        raise bad("unsupported_media_type",
                  f"send multipart/form-data or application/json, not {ctype or 'nothing'}", 415)
    vqa = await hooks.traced("read upload", within_body_timeout(settings, read(request, settings)))
    if vqa.image_url is not None:  # after the body's timeout: the fetch has its own (--media-timeout-s)
        vqa = dataclasses.replace(vqa, image=await fetch_image(vqa.image_url, settings))
    return vqa


def check_length(request: web.Request, settings: Settings) -> None:
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise bad("body_too_large", f"the request body is {request.content_length} bytes; the limit is "
                  f"{settings.max_body_bytes} (--max-body-mb {settings.max_body_mb:g})", 413)


async def within_body_timeout(settings: Settings, reading: Awaitable[T]) -> T:
    """A client that trickles its body would hold a connection and a handler for as long as it likes."""
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            return await reading
    except TimeoutError:
        raise bad("request_timeout", f"the request body did not arrive within {settings.body_timeout_s:g} s",
                  408) from None


def media_type(request: web.Request) -> str:
    """`type/subtype` of the body, lowercased. aiohttp's `request.content_type` parses the whole header with the
    email package, which costs more than the rest of reading a small upload; the parameters are not needed here
    (the multipart reader finds the boundary itself)."""
    return request.headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower()


async def _from_multipart(request: web.Request, settings: Settings) -> VqaInput:
    if media_type(request) == "application/x-www-form-urlencoded":  # such a form cannot carry a file
        return await _follow_up_form(request, settings)
    # Read the parts ourselves, in memory and bounded: no spooled temporary files to leak on a bad request.
    image: bytes | None = None
    api_key: bytes | None = None
    image_id: bytes | None = None
    questions: list[bytes] = []
    total = parts = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise bad("invalid_multipart", "nested multipart bodies are not accepted")
            # Each part costs event-loop time: without a bound, a form of many tiny parts holds a worker for
            # seconds (bench/RESULTS.md, the many-parts bench).
            parts += 1
            if parts > settings.max_form_parts:
                raise bad("too_many_parts", f"the form has more than {settings.max_form_parts} parts; send one "
                          f"'image' and at most {settings.max_questions} 'question' fields")
            data = await part.read()
            total += len(data)
            if total > settings.max_body_bytes:
                raise bad("body_too_large", f"the upload is larger than {settings.max_body_mb:g} MB", 413)
            name, filename = part_names(part)
            if name == "image":
                if filename is None:
                    raise bad("missing_image", "the 'image' field must be a file upload, not text")
                image = bytes(data)
            elif name in ("question", "questions"):
                if filename is not None:
                    raise bad("invalid_field", "'question' must be text, not a file")
                questions.append(bytes(data))
            elif name == "api_key" and filename is None:
                api_key = bytes(data)
            elif name == "image_id":
                if filename is not None:
                    raise bad("invalid_image_id", "'image_id' must be text, not a file")
                image_id = bytes(data)
    except ApiError:
        raise
    except (ValueError, AssertionError, HttpProcessingError, web.HTTPException) as e:  # malformed framing
        if isinstance(e, web.HTTPException) and e.status == 413:
            raise
        raise bad("invalid_multipart", f"the multipart body cannot be read: {e}") from e
    named = named_image(request, None if image_id is None else image_id.decode("utf-8", "replace"),
                        sent_image=bool(image))  # an empty file part is what a browser sends for no file
    # A follow-up's `image` stays empty: the service takes the embedding from its cache.
    vqa = _form_input(image, questions, settings) if named is None else \
        dataclasses.replace(_form_input(b"", questions, settings), image_id=named)
    if api_key:
        return dataclasses.replace(vqa, api_key=api_key.decode("utf-8", "replace"))
    return vqa


async def _follow_up_form(request: web.Request, settings: Settings) -> VqaInput:
    """A form without a file (`curl -d`) can only be a follow-up: it names the image by `image_id`."""
    fields = await request.post()  # bounded by the app's client_max_size
    if len(fields) > settings.max_form_parts:
        raise bad("too_many_parts", f"the form has more than {settings.max_form_parts} fields")
    named = named_image(request, fields.get("image_id"), sent_image=False)
    if named is None or "image" in fields:
        raise bad("missing_image", "add the picture as a file field named 'image' (a multipart/form-data upload), "
                  "or name a previous answer's image with 'image_id'")
    questions = [q for q in fields.getall("question", []) + fields.getall("questions", []) if isinstance(q, str)]
    return VqaInput(b"", check_questions(questions, settings), plural=len(questions) > 1, image_id=named)


# What browsers, curl, requests and aiohttp send: `form-data; name="x"` with an optional `; filename="y"`.
# A value that starts with / or \ goes to aiohttp too (it strips that character).
_SIMPLE_DISPOSITION = re.compile(r'form-data; name="([^"\\/][^"\\]*)"(?:; filename="([^"\\/][^"\\]*)")?', re.ASCII)


def part_names(part: BodyPartReader) -> tuple[str | None, str | None]:
    """The field name and file name of a form part. The common header is read with one regex; anything else
    (escapes, `filename*=`, other parameters) goes to aiohttp's full parser, which costs a tenth of a
    millisecond of event-loop time per part."""
    match = _SIMPLE_DISPOSITION.fullmatch(part.headers.get(hdrs.CONTENT_DISPOSITION, ""))
    if match:
        return match.group(1), match.group(2)
    return part.name, part.filename


def _form_input(image: bytes | None, raw_questions: list[bytes], settings: Settings) -> VqaInput:
    if image is None:
        raise bad("missing_image", "add the picture as a file field named 'image' (or, for a follow-up question, "
                  "a previous answer's 'image_id')")
    questions = []
    for q in raw_questions:
        try:
            questions.append(q.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise bad("invalid_utf8", "the question is not valid UTF-8") from e
    return VqaInput(image, check_questions(questions, settings), plural=len(questions) > 1)


async def read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if "utf-8" in str(e).lower():
            raise bad("invalid_utf8", "the JSON body is not valid UTF-8") from e
        raise bad("invalid_json", f"the body is not valid JSON: {e}") from e


def decode_base64(text: str, what: str = "'image'") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad("invalid_base64", f"{what} is not valid base64") from e


async def _from_json(request: web.Request, settings: Settings) -> VqaInput:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad("invalid_json", "the JSON body must be an object with 'image' and 'question' or 'questions'")
    named = named_image(request, body.get("image_id"), sent_image=bool(body.get("image")) or "image_url" in body)
    if named is not None:  # a follow-up: no image to read
        return dataclasses.replace(_json_questions(body, b"", settings), image_id=named)
    if "image_url" in body:
        url = _image_url(body)
        return dataclasses.replace(_json_questions(body, b"", settings), image_url=url)
    image_b64 = body.get("image")
    if not image_b64:
        raise bad("missing_image", "add the picture as base64 in the field 'image'")
    if not isinstance(image_b64, str):
        raise bad("invalid_base64", "'image' must be a base64 string")
    if image_b64.startswith("data:") and "," in image_b64:  # a data URL from a browser
        image_b64 = image_b64.split(",", 1)[1]
    data = decode_base64(image_b64)
    return _json_questions(body, data, settings)


_IMAGE_ID = re.compile(r"[0-9a-fA-F]{64}")
IMAGE_ID_HEADER = "X-Image-Id"  # on every answer; a follow-up may send it too


def named_image(request: web.Request, field: object, sent_image: bool) -> str | None:
    """The image a follow-up names instead of sending it: a previous answer's `image_id`, as a form field or JSON
    key, or as the `X-Image-Id` header or the `image_id` query parameter (which a proxy reads without parsing the
    body). None when the request names none; lowercased."""
    given = [v for v in (field, request.query.get("image_id"), request.headers.get(IMAGE_ID_HEADER)) if v is not None]
    if not given:
        return None
    ids = set()
    for v in given:
        if not isinstance(v, str) or not _IMAGE_ID.fullmatch(v):
            raise bad("invalid_image_id", "'image_id' must be a previous answer's image_id: 64 hex characters")
        ids.add(v.lower())
    if len(ids) > 1:
        raise bad("invalid_image_id", "the request names two different images (the image_id field, the X-Image-Id "
                  "header, the image_id query parameter)")
    if sent_image:
        raise bad("image_and_image_id", "send the image or a previous answer's image_id, not both")
    return ids.pop()


def _image_url(body: dict[str, object]) -> str:
    url = body["image_url"]
    if "image" in body:
        raise bad("invalid_field", "send 'image' or 'image_url', not both")
    if not isinstance(url, str):
        raise bad("image_url_invalid", "'image_url' must be a string: an http or https URL")
    return url


def _json_questions(body: dict[str, object], data: bytes, settings: Settings) -> VqaInput:
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
        # The bound is on the question as sent (what /openapi.json's maxLength says), spaces included.
        if len(q) > settings.max_question_chars:
            raise bad("question_too_long", f"a question has {len(q)} characters; at most "
                      f"{settings.max_question_chars}")
        q = q.strip()
        if not q:
            raise bad("empty_question", "a question is empty")
        out.append(q)
    return out
