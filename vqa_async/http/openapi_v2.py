"""The OpenAPI description of the Open Inference Protocol's routes (vqa_async/http/open_inference.py), for
openapi.py. The shared pieces (an answer's headers, the error statuses) come in as arguments, as openapi.py has them.

What JSON Schema cannot say is in the descriptions: the inputs are `image` (one element) and `question`, a tensor's
element count is its shape's product, and binary data follows the JSON part when Inference-Header-Content-Length
says where that part ends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vqa_async.config import Settings

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
IMAGE_ID = {"type": "string", "pattern": "^[0-9a-fA-F]{64}$",
            "description": "instead of the image input: a previous answer's image_id (also the X-Image-Id header, "
                           "which the cluster's HAProxy routes on)"}


def v2_schemas() -> dict[str, Any]:
    element = {"oneOf": [_STR, {"type": "array"}]}  # strings, nested as the shape (row-major)
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string", "enum": ["image", "question"]},
        "datatype": {"type": "string", "enum": ["BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "items": element,
                 "description": "the elements: the image as base64, the questions as text; or, with binary data, "
                                "none here and parameters.binary_data_size instead"},
        "parameters": {"type": "object", "properties": {"binary_data_size": {
            "type": "integer", "minimum": 0,
            "description": "this input's bytes in the binary part, in the order of the inputs: each element a "
                           "4-byte little-endian length, then its bytes"}}}}}
    output = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "enum": ["answer"]},
        "parameters": {"type": "object", "properties": {"binary_data": _BOOL}}}}
    meta_tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": _STR, "datatype": _STR, "shape": {"type": "array", "items": {"type": "integer"}}}}
    return {
        "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": _STR, "inputs": {"type": "array", "items": tensor},
            "outputs": {"type": "array", "items": output},
            "parameters": {"type": "object", "properties": {"binary_data_output": _BOOL, "image_id": IMAGE_ID}}}},
        "V2InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": _STR, "id": _STR,
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"],
                                                   "properties": {
                "name": _STR, "datatype": _STR, "shape": {"type": "array", "items": {"type": "integer"}},
                "data": {"type": "array", "items": _STR},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}}}}},
            "parameters": {"type": "object", "properties": {
                "image_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "queue_ms": {"type": "number"},
                "compute_ms": {"type": "number"}, "batch_size": {"type": "integer"}}}}},
        "V2ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": _STR, "version": _STR, "extensions": {"type": "array", "items": _STR}}},
        "V2ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"], "properties": {
            "name": _STR, "platform": _STR, "inputs": {"type": "array", "items": meta_tensor},
            "outputs": {"type": "array", "items": meta_tensor}, "parameters": {"type": "object"}}},
        "V2ModelReady": {"type": "object", "required": ["name", "ready"], "properties": {"name": _STR,
                                                                                       "ready": _BOOL}},
    }


def v2_error(codes: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": ["error", "code"], "properties": {
        "error": {"type": "string", "description": "what went wrong (the protocol's error shape)"},
        "code": {"type": "string", "enum": codes}, "request_id": _STR, "error_id": _STR}}


def v2_paths(settings: Settings, secured: dict[str, Any], errors: dict[str, Any], answer: Callable[..., Any],
             json: Callable[[str], dict[str, Any]], image_id_header: dict[str, Any],
             retry_after: dict[str, Any]) -> dict[str, Any]:
    """`errors`: the failures of an answering route in the V2Error shape; `answer` and `json` build a response and
    a JSON content as openapi.py does."""
    # The served model's name, as the loader names it (its directory's): any other is 404 not_found.
    model = Path(settings.model).name if settings.model else "demo"
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": [model]},
             "description": "the model's name, as GET /v1/models lists it"}]
    lookup = {"404": answer("not_found: no model of that name here", json("V2Error")),
              "503": answer("not_ready: the model is loading", json("V2Error"), **retry_after)}
    keyed = {"401": errors["401"]} if "401" in errors else {}
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "/v2": {"get": {"summary": "Open Inference Protocol: server metadata", **secured, "responses": {
            "200": answer("name, version, extensions", json("V2ServerMetadata")), **keyed}}},
        "/v2/models/{name}": {"get": {"summary": "Open Inference Protocol: the model's inputs and outputs",
                                      **secured, "parameters": name, "responses": {
                                          "200": answer("metadata", json("V2ModelMetadata")), **lookup, **keyed}}},
        "/v2/models/{name}/ready": {"get": {"summary": "Open Inference Protocol: the model's readiness", **secured,
                                            "parameters": name, "responses": {
                                                "200": answer("ready", json("V2ModelReady")), **lookup, **keyed}}},
        "/v2/models/{name}/infer": {"post": {
            "summary": "Open Inference Protocol: answer BYTES `question`s about a BYTES `image`",
            "description": "JSON, or with Triton's binary-data extension the JSON part followed by the binary data "
                           "(application/octet-stream; the Inference-Header-Content-Length header is the JSON part's "
                           f"length). At most {settings.max_questions} questions. The answer is JSON, or with "
                           "binary outputs (outputs[].parameters.binary_data, parameters.binary_data_output) the "
                           "JSON part and the binary answers, with Inference-Header-Content-Length.",
            **secured, "parameters": name,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/V2InferRequest"}}, **binary}},
            "responses": {"200": answer("the answers", {**json("V2InferResponse"), **binary}, **image_id_header),
                          **errors, "404": lookup["404"]}}},
    }
