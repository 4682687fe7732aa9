"""OpenAI's chat-completions shape (`POST /v1/chat/completions`, `GET /v1/models`) over the same path as /v1/vqa.

A request names one image (an `image_url` content part: a `data:` URL, or an http(s) URL when
`--allowed-media-domains` lets media_fetch fetch it) and asks the last user message's text. It goes through the
same middlewares (keys, request ids, access log, metrics) and `handlers.ask` (per-client quota, fair share, the
batcher) as /v1/vqa; errors are OpenAI's shape with our stable codes (errors.openai_error_body).

The model answers greedily with its own beam search: sampling parameters are accepted and ignored, several
choices (`n` > 1) and tools are refused. The answer exists whole before the first byte is sent, so a stream is
the whole answer in one content chunk, and a failure is still a plain status (that HAProxy can retry) rather
than an error inside a 200 stream.

`usage` counts text tokens with the model's own tokenizer: `prompt_tokens` is the question as the text encoder
sees it ([CLS] ... [SEP], truncated where the model truncates), `completion_tokens` the answer's word pieces. The
image is not counted: it is no token sequence to this model (the vision encoder's output is cached by image and
costs the same whatever is asked).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from vqa_async.core.service import Outcome
from vqa_async.http.app_keys import SERVICE, SETTINGS
from vqa_async.http.context import REQUEST_ID, TRACEPARENT
from vqa_async.http.errors import ApiError, json_response, refuse
from vqa_async.http.handlers import ask
from vqa_async.http.media_fetch import fetch_image
from vqa_async.http.parse import (
    VqaInput,
    check_length,
    check_questions,
    decode_base64,
    media_type,
    read_json,
    within_body_timeout,
)
from vqa_async.http.tracing import server_timing
from vqa_async.model.preprocess import QuestionTokenizer

CHAT_ROUTE = "/v1/chat/completions"
MODELS_ROUTE = "/v1/models"
OWNER = "vqa-async"
ROLES = frozenset({"system", "developer", "user", "assistant"})  # tool results have no place: tools are refused
# Asking for what this model cannot do is refused; everything else it does not use is ignored.
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call")


def bad(code: str, message: str, param: str | None = None) -> ApiError:
    return refuse(code, message, param=param)


@dataclass(frozen=True)
class ChatRequest:
    image_url: str
    question: str
    max_tokens: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


# -- reading ---------------------------------------------------------------------------------------------------------

def read_chat_request(body: object) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("invalid_json", "the JSON body must be an object with 'messages'")
    for name in TOOL_FIELDS:
        if body.get(name) not in (None, [], "none"):
            raise bad("unsupported_parameter", f"'{name}': this model answers questions about an image; it cannot "
                      "call tools or functions", name)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n < 1):
        raise bad("invalid_field", "'n' must be a whole number, at least 1", "n")
    if n is not None and n > 1:
        raise bad("unsupported_parameter", "'n' must be 1: the model gives one answer per question", "n")
    if not isinstance(body.get("model", ""), str):
        raise bad("invalid_field", "'model' must be a string (any name: this server answers with its one model)",
                  "model")
    if body.get("logprobs") not in (None, False):
        raise bad("unsupported_parameter", "'logprobs' are not available from this model", "logprobs")
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("invalid_field", "'stream_options.include_usage' must be true or false", "stream_options")
    limits = [_max_tokens(body, name) for name in ("max_tokens", "max_completion_tokens")]
    given = [m for m in limits if m is not None]
    image_url, question = read_messages(body.get("messages"))
    return ChatRequest(image_url, question, min(given) if given else None, stream, include_usage)


def read_messages(messages: object) -> tuple[str, str]:
    """The one image of the conversation and the last user message's text."""
    if not isinstance(messages, list) or not messages:
        raise bad("invalid_field", "'messages' must be a non-empty list of messages", "messages")
    images: list[str] = []
    question: list[str] = []  # the last user message's text parts
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or msg["role"] not in ROLES:
            raise bad("invalid_field", f"{where} must be an object with a 'role' ({', '.join(sorted(ROLES))})",
                      "messages")
        if msg.get("content") is None and msg["role"] != "assistant":
            raise bad("invalid_field", f"{where} needs its 'content'", "messages")
        texts, urls = _content(msg.get("content"), where)
        if urls and msg["role"] != "user":
            raise bad("invalid_field", f"{where}: only a user message may carry an image", "messages")
        images += urls
        if msg["role"] == "user":
            question = texts
    if len(images) > 1:
        raise bad("too_many_images", f"the conversation has {len(images)} images; this server answers about one "
                  "image per request", "messages")
    if not images:
        raise bad("missing_image", "add the picture as an image_url content part (a data: URL) in a user message",
                  "messages")
    if not question:
        raise bad("missing_question", "ask something: the last user message needs a text part", "messages")
    return images[0], "\n".join(question)


def _content(content: object, where: str) -> tuple[list[str], list[str]]:
    """The text parts and image URLs of one message's content (a string, or a list of parts)."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise bad("invalid_field", f"{where}.content must be a string or a list of content parts", "messages")
    texts: list[str] = []
    urls: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad("image_url_invalid", f"{where}.content[{j}]: 'image_url' needs a 'url' string", "messages")
            urls.append(url)
        elif kind in ("text", None):
            raise bad("invalid_field", f"{where}.content[{j}] must be a part with a 'type' ('text' with a 'text' "
                      "string, or 'image_url')", "messages")
        else:
            raise bad("unsupported_content", f"{where}.content[{j}]: '{kind}' parts are not accepted; send 'text' "
                      "and one 'image_url'", "messages")
    return texts, urls


def _optional(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad("invalid_field", f"'{name}' must be {'true or false' if kind is bool else 'an object'}", name)
    return value


def _is_int(value: object) -> bool:
    """A whole number as JSON has it (1.0 is one too)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _max_tokens(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise bad("invalid_field", f"'{name}' must be a whole number, at least 1", name)
    return int(value)


async def image_bytes(url: str, request: web.Request) -> bytes:
    scheme = url.partition(":")[0].lower()  # schemes are case-insensitive (RFC 3986)
    if scheme == "data":
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad("image_url_invalid", "a data: URL must be base64: data:image/jpeg;base64,...", "messages")
        try:
            return decode_base64(data, "the data: URL's payload")
        except ApiError as e:
            e.param = "messages"
            raise
    if scheme in ("http", "https"):
        return await fetch_image(url, request.app[SETTINGS])
    raise bad("image_url_invalid", "an image URL is a data: URL (or http(s), where the server allows it)", "messages")


# -- answering -------------------------------------------------------------------------------------------------------

def completion(out: Outcome, question: str, max_tokens: int | None, tokenizer: QuestionTokenizer) -> Completion:
    """The answer within `max_tokens` word pieces, and its token counts."""
    answered = out.answers[0]
    special = set(tokenizer.tokenizer.all_special_ids)
    pieces = [t for t in answered.token_ids if t not in special]
    prompt = int(tokenizer.encode([question]).attention_mask.sum())
    if max_tokens is not None and len(pieces) > max_tokens:
        return Completion(tokenizer.tokenizer.decode(pieces[:max_tokens]), "length", prompt, max_tokens)
    # No [SEP]: the model's own answer length ran out before it ended the answer.
    ended = tokenizer.tokenizer.sep_token_id in answered.token_ids[1:]
    return Completion(answered.text, "stop" if ended else "length", prompt, len(pieces))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    check_length(request, settings)
    if media_type(request) != "application/json":
        raise bad("unsupported_media_type", "send application/json")
    chat = read_chat_request(await within_body_timeout(settings, read_json(request)))
    question = check_questions([chat.question], settings)[0]
    image = await image_bytes(chat.image_url, request)
    out = await ask(request, VqaInput(image, [question], plural=False))
    service = request.app[SERVICE]
    assert service.loaded is not None  # it answered
    done = completion(out, question, chat.max_tokens, service.loaded.tokenizer)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_name}
    if not chat.stream:
        return json_response({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
            "logprobs": None, "finish_reason": done.finish_reason}], "usage": done.usage})
    return await stream(request, head, done, chat.include_usage)


async def stream(request: web.Request, head: dict[str, Any], done: Completion,
                 include_usage: bool) -> web.StreamResponse:
    """Server-sent events as OpenAI sends them: role, content, finish_reason, usage (when asked), [DONE]."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # The tracing middleware sets these after the handler, too late for a response already sent.
    resp.headers["X-Request-ID"] = request[REQUEST_ID]
    if tp := request.get(TRACEPARENT):
        resp.headers["traceparent"] = tp
    # Queue, preprocess and compute; no total, which is not known before the response starts.
    resp.headers["Server-Timing"] = server_timing(request, 0.0).rpartition(", ")[0]
    chunk = {**head, "object": "chat.completion.chunk"}
    usage_null = {"usage": None} if include_usage else {}

    def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**chunk, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}],
                **usage_null}

    events = [delta({"role": "assistant", "content": ""}), delta({"content": done.text}),
              delta({}, done.finish_reason)]
    if include_usage:
        events.append({**chunk, "choices": [], "usage": done.usage})
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    await resp.prepare(request)
    try:
        await resp.write(body)
        await resp.write_eof()
    except ConnectionResetError:  # the client left; its answer was computed and is counted
        pass
    return resp


async def models(request: web.Request) -> web.Response:
    loaded = request.app[SERVICE].loaded
    if loaded is None:
        raise refuse("not_ready", "the model is not loaded yet", {"Retry-After": "2"})
    # `created`: when the serving directory was written (converted or trained), the model's own date.
    return json_response({"object": "list", "data": [{
        "id": loaded.name, "object": "model", "created": int(loaded.model_dir.stat().st_mtime), "owned_by": OWNER}]})


def add_routes(app: web.Application) -> None:
    app.router.add_post(CHAT_ROUTE, chat_completions)
    app.router.add_get(MODELS_ROUTE, models)
