"""The Open Inference Protocol's tensors for this model, read and written: no HTTP here (http/open_inference.py).

A request is a JSON object (`inputs`, optional `outputs`, `parameters`, `id`), alone or, with Triton's binary-data
extension, followed by the tensors' bytes: the `Inference-Header-Content-Length` header says where the JSON ends,
and each input that travels in binary says its size as `parameters.binary_data_size`, in the order of `inputs`.
A BYTES tensor in binary is its elements one after another, each a 4-byte little-endian length and the bytes; in
JSON it is a (possibly nested) list of strings, and an image in JSON is base64, as KServe's manual says binary
content must be.

The model takes `image` (BYTES, one element: the picture's bytes) and `question` (BYTES, one or more UTF-8
questions) and gives `answer` (BYTES, one UTF-8 answer per question). Every way a request can be wrong is an ApiError
with one of the stable codes of /v1/vqa.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from vqa_async.http.errors import ApiError
from vqa_async.http.parse import decode_base64

IMAGE, QUESTION, ANSWER = "image", "question", "answer"
BYTES = "BYTES"
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


def bad(code: str, message: str, status: int = 400) -> ApiError:
    return ApiError(status, code, message)


@dataclass(frozen=True)
class InferRequest:
    image: bytes | None  # None: a follow-up naming its image by `image_id`
    questions: list[str]
    image_id: str | None  # `parameters.image_id`: a previous answer's image
    request_id: str | None  # the client's `id`, echoed
    binary_output: bool  # the answers as binary data rather than JSON strings
    question_shape: list[int]  # the answer has the questions' shape


def read_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request in `body`; `header_length` is the Inference-Header-Content-Length header, if any."""
    json_end = len(body) if header_length is None else _header_length(header_length, len(body))
    try:
        head = orjson.loads(body[:json_end])
    except orjson.JSONDecodeError as e:
        code = "invalid_utf8" if "utf-8" in str(e).lower() else "invalid_json"
        raise bad(code, f"the inference request's JSON cannot be read: {e}") from e
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise bad("invalid_json", "the inference request must be a JSON object with an 'inputs' list")
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad("invalid_field", "'id' must be a string")
    params = _object(head.get("parameters"), "parameters")
    tensors = _inputs(head["inputs"], memoryview(body)[json_end:])
    image_id = params.get("image_id")
    if image_id is not None and not isinstance(image_id, str):
        raise bad("invalid_image_id", "'parameters.image_id' must be a previous answer's image_id: a string")
    if QUESTION not in tensors:
        raise bad("missing_question", "add a 'question' input: BYTES, one or more questions")
    questions_raw, shape = tensors[QUESTION]
    questions = []
    for q in questions_raw:
        try:
            questions.append(q.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise bad("invalid_utf8", "a question is not valid UTF-8") from e
    image = None
    if IMAGE in tensors:
        elements, _ = tensors[IMAGE]
        if len(elements) != 1:
            raise bad("invalid_field", f"the 'image' input holds {len(elements)} elements; send one image")
        image = elements[0]
    return InferRequest(image, questions, image_id, request_id,
                        _binary_output(head.get("outputs"), params), shape)


def _header_length(value: str, body_length: int) -> int:
    if not value.strip().isdigit() or not 0 < int(value) <= body_length:
        raise bad("invalid_field", f"{HEADER_LENGTH} must be the length of the request's JSON part, 1 to "
                  f"{body_length} (the body's length), not {value[:20]!r}")
    return int(value)


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("invalid_field", f"'{where}' must be an object")
    return value


def _inputs(inputs: list[object], binary: memoryview) -> dict[str, tuple[list[bytes], list[int]]]:
    """Each input's elements (as bytes) and shape, by name; the binary parts consumed in order."""
    out: dict[str, tuple[list[bytes], list[int]]] = {}
    at = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise bad("invalid_field", f"inputs[{i}] must be an object with a 'name', 'datatype' and 'shape'")
        name = tensor["name"]
        if name not in (IMAGE, QUESTION):
            raise bad("invalid_field", f"unknown input '{name[:64]}': this model takes 'image' and 'question'")
        if name in out:
            raise bad("invalid_field", f"the input '{name}' is given twice")
        if tensor.get("datatype") != BYTES:
            raise bad("invalid_field", f"the input '{name}' must have the datatype BYTES")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad("invalid_field", f"the input '{name}' needs a 'shape': a list of whole numbers")
        size = _object(tensor.get("parameters"), f"inputs[{i}].parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
                raise bad("invalid_field", f"the input '{name}': binary_data_size {size!r} does not fit the "
                          f"{len(binary) - at} binary bytes left after the JSON")
            if "data" in tensor:
                raise bad("invalid_field", f"the input '{name}' has both 'data' and binary_data_size")
            elements = _binary_elements(binary[at:at + size], name)
            at += size
        elif "data" in tensor:
            elements = _json_elements(tensor["data"], name)
        else:
            raise bad("missing_image" if name == IMAGE else "missing_question",
                      f"the input '{name}' has no 'data' (nor binary_data_size)")
        if len(elements) != math.prod(shape):
            raise bad("invalid_field", f"the input '{name}' has {len(elements)} elements; its shape {shape} says "
                      f"{math.prod(shape)}")
        out[name] = elements, shape
    if at != len(binary):
        raise bad("invalid_field", f"{len(binary) - at} bytes after the JSON belong to no input (binary_data_size)")
    return out


def _binary_elements(data: memoryview, name: str) -> list[bytes]:
    """A BYTES tensor in binary: each element a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise bad("invalid_field", f"the input '{name}': its binary data ends inside an element's length")
        (n,) = _LENGTH.unpack_from(data, at)
        if at + 4 + n > len(data):
            raise bad("invalid_field", f"the input '{name}': an element of {n} bytes runs past its binary data")
        out.append(bytes(data[at + 4:at + 4 + n]))
        at += 4 + n
    return out


def _json_elements(data: object, name: str) -> list[bytes]:
    """A BYTES tensor in JSON: strings in a list, nested as the shape (row-major); the image's is base64."""
    if not isinstance(data, list):
        raise bad("invalid_field", f"the input '{name}': 'data' must be a list (of strings, for BYTES)")
    flat: list[object] = []
    stack: list[object] = [data]
    while stack:  # depth-first, in order
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if not all(isinstance(x, str) for x in flat):
        raise bad("invalid_field", f"the input '{name}': a BYTES tensor's 'data' is a list of strings")
    if name == IMAGE:
        return [decode_base64(str(x), "the 'image' input (in JSON, base64)") for x in flat]
    return [str(x).encode() for x in flat]


def _binary_output(outputs: object, params: dict[str, Any]) -> bool:
    binary = params.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise bad("invalid_field", "'parameters.binary_data_output' must be true or false")
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise bad("invalid_field", "'outputs' must be a list")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or out.get("name") != ANSWER:
            raise bad("invalid_field", f"outputs[{i}]: this model has one output, 'answer'")
        own = _object(out.get("parameters"), f"outputs[{i}].parameters").get("binary_data")
        if own is not None:
            if not isinstance(own, bool):
                raise bad("invalid_field", f"outputs[{i}].parameters.binary_data must be true or false")
            binary = own
    return binary


def infer_response(model: str, request: InferRequest, answers: list[str],
                   parameters: dict[str, Any]) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary data follows it."""
    shape = request.question_shape
    output: dict[str, Any] = {"name": ANSWER, "datatype": BYTES, "shape": shape}
    blob = b""
    if request.binary_output:
        encoded = [a.encode() for a in answers]
        blob = b"".join(_LENGTH.pack(len(a)) + a for a in encoded)
        output["parameters"] = {"binary_data_size": len(blob)}
    else:
        output["data"] = answers
    body: dict[str, Any] = {"model_name": model, "outputs": [output], "parameters": parameters}
    if request.request_id is not None:
        body["id"] = request.request_id
    head = orjson.dumps(body)
    return (head + blob, len(head)) if request.binary_output else (head, None)
