"""The OpenAPI schemas of the OpenAI-compatible routes (vqa_async/http/openai_api.py), for openapi.py.

What JSON Schema cannot say is in the descriptions: a conversation holds exactly one image, the question is the last
user message's text (its parts joined by newlines, within the question's length), and fields this model does not
use are ignored.
"""

from __future__ import annotations

from typing import Any

from vqa_async.config import Settings

IGNORED = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "stop", "user",
           "top_logprobs", "response_format", "metadata", "store", "service_tier", "parallel_tool_calls",
           "reasoning_effort", "modalities", "prediction")

_STR = {"type": "string"}


def chat_request(settings: Settings) -> dict[str, Any]:
    # Any text: only the last user message's is the question, bounded when read (a system prompt may be long).
    text = _STR
    text_part = {"type": "object", "required": ["type", "text"], "properties": {
        "type": {"type": "string", "enum": ["text"]}, "text": text}}
    image_part = {"type": "object", "required": ["type", "image_url"], "properties": {
        "type": {"type": "string", "enum": ["image_url"]},
        "image_url": {"type": "object", "required": ["url"], "properties": {"url": {
            "type": "string", "pattern": r"^data:image/[a-z0-9.+-]+;base64,([A-Za-z0-9+/]{4})+$",
            "description": "a base64 data: URL of the image; an http(s) URL only on a host --allowed-media-domains "
                           "names. `detail` is ignored"}}}}}
    texts = {"oneOf": [text, {"type": "array", "items": text_part}]}
    user = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["user"]},
        "content": {"oneOf": [text, {"type": "array", "items": {"oneOf": [text_part, image_part]}}]}}}
    system = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer"]}, "content": texts}}
    assistant = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["assistant"]}, "content": {**texts, "nullable": True}}}
    at_least_1 = {"type": "integer", "minimum": 1, "nullable": True}
    return {"type": "object", "required": ["messages"], "description": (
        "OpenAI's chat-completions request. Exactly one image in the conversation (a second: 400 too_many_images; "
        "none: 400 missing_image); the question is the last user message's text (none: 400 missing_question; "
        f"blank: empty_question; over {settings.max_question_chars} characters: question_too_long). "
        "Earlier turns are not seen by the model. Accepted and ignored: " + ", ".join(IGNORED) + ". Refused "
        "(400 unsupported_parameter): n > 1, tools, tool_choice, functions, function_call, logprobs."),
        "properties": {
            "model": {"type": "string", "description": "any name: the loaded model answers (see /v1/models)"},
            "messages": {"type": "array", "minItems": 1, "items": {"oneOf": [user, system, assistant]}},
            "stream": {"type": "boolean", "nullable": True,
                       "description": "server-sent events: a role chunk, the answer, a chunk with finish_reason, "
                                      "a usage chunk when stream_options.include_usage, then data: [DONE]"},
            "stream_options": {"type": "object", "nullable": True,
                               "properties": {"include_usage": {"type": "boolean"}}},
            "max_tokens": {**at_least_1, "description": "answer tokens at most (finish_reason length when cut)"},
            "max_completion_tokens": {**at_least_1, "description": "the same; the smaller of the two applies"},
            "n": {**at_least_1, "maximum": 1, "description": "one answer per request"}}}


def chat_schemas() -> dict[str, Any]:
    """Components: the answer, the model list and the error shape of these routes."""
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
        "prompt_tokens": {"type": "integer", "description": "the question's tokens as the text encoder sees them "
                                                            "([CLS] and [SEP] included); the image is not counted"},
        "completion_tokens": {"type": "integer", "description": "the answer's word pieces"},
        "total_tokens": {"type": "integer"}}}
    return {
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                           "properties": {
            "id": {"type": "string", "pattern": "^chatcmpl-"}, "object": {"type": "string",
                                                                          "enum": ["chat.completion"]},
            "created": {"type": "integer"}, "model": _STR, "usage": usage,
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
                    "index": {"type": "integer"},
                    "message": {"type": "object", "required": ["role", "content"], "properties": {
                        "role": {"type": "string", "enum": ["assistant"]}, "content": _STR}},
                    "finish_reason": {"type": "string", "enum": ["stop", "length"]}}}}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                    "id": _STR, "object": {"type": "string", "enum": ["model"]}, "created": {"type": "integer"},
                    "owned_by": _STR}}}}},
    }


def openai_error(codes: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": _STR, "code": {"type": "string", "enum": codes},
            "type": {"type": "string", "description": "invalid_request_error, authentication_error, "
                                                      "rate_limit_error or server_error"},
            "param": {"type": "string", "nullable": True, "description": "the request field at fault"},
            "error_id": {"type": "string", "description": "an unexpected failure's id in the log"},
            "request_id": {"type": "string", "description": "the X-Request-ID of this request"}}}}}
