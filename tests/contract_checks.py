"""A schemathesis check for tests/test_contract.py (loaded through SCHEMATHESIS_HOOKS): a request the schema allows
is answered, unless what refuses it is something no schema can say.

schemathesis's own `positive_data_acceptance` cannot run here: random bytes that fit `format: binary` are rightly
refused (invalid_image). This check reads the refusal's stable code instead, and lets through only the codes that
depend on the bytes or on the server's state, or (on /v1/chat/completions) on the whole conversation. Any other
refusal of schema-valid data (an empty image, two images, a blank question, ...) means the schema promises more
than the server takes.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis

# An image's bytes, or which images this server holds.
BYTES_OR_STATE = {"invalid_image", "unsupported_image_format", "image_too_large", "image_not_cached",
                  # field names a tester makes up with control characters: the multipart framing, not the fields
                  "invalid_multipart"}
# JSON Schema cannot count images across messages, nor bound the text of the last user message only.
CONVERSATION = {"missing_image", "too_many_images", "missing_question", "empty_question", "question_too_long"}
# The Open Inference Protocol's tensors are generic: a schema cannot say which input is required, that a tensor's
# element count is its shape's product, that the image's element is base64, nor bound each question; and the binary
# form (application/octet-stream) is a JSON part and tensors that `format: binary` cannot describe.
V2_TENSORS = {"missing_image", "missing_question", "invalid_field", "invalid_base64", "empty_question",
              "question_too_long", "too_many_questions", "image_and_image_id", "invalid_utf8", "invalid_json"}
# Who is asking and how much: credentials and limits, not the request's shape.
NOT_SHAPE_STATUSES = {401, 408, 429, 503}
_CODE = re.compile(r'"code":\s*"([a-z0-9_]+)"|<code>\(([a-z0-9_]+)\)</code>')


def refusal_code(text: str) -> str | None:
    match = _CODE.search(text)
    return (match.group(1) or match.group(2)) if match else None


def _made_up_form_question(case: Any) -> bool:
    """A form field is text, so the schema leaves its type open ("{}" is a question): an object or array the tester
    makes up goes as its JSON text, which no maxLength covers."""
    body = case.body if isinstance(case.body, dict) else {}
    values = body.get("question")
    values = values if isinstance(values, list) else [values]
    return case.media_type == "multipart/form-data" and any(not isinstance(v, str) for v in values)


@schemathesis.check
def valid_data_is_refused_only_for_its_bytes(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code < 400 or response.status_code in NOT_SHAPE_STATUSES:
        return None
    code = refusal_code(response.text)
    allowed = BYTES_OR_STATE | (CONVERSATION if case.path == "/v1/chat/completions" else set()) | (
        V2_TENSORS if case.path == "/v2/models/{name}/infer" else set())
    if code == "question_too_long" and _made_up_form_question(case):
        return None
    if code not in allowed:
        raise AssertionError(f"data the schema allows was refused: {response.status_code} {code}")
    return None
