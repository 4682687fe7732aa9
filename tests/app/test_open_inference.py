"""The Open Inference Protocol (KServe v2) in the real app with the demo model: metadata, readiness, inference in
JSON and with Triton's binary-data extension (the bytes built here as the protocol has them), follow-ups by image id,
and every refusal in the protocol's error shape with our stable code. The real clients (tritonclient, KServe's SDK)
against a live serve and the cluster are in tests/test_open_inference_clients.py."""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from vqa_async.app import init_app
from vqa_async.config import Settings

ClientMaker = Callable[..., Awaitable[TestClient[Any, Any]]]
KEY = "v2-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["what shape is in the image?", "what color is the shape?"]
INFER = "/v2/models/demo/infer"


@pytest.fixture
def make_client(aiohttp_client: Any, demo_dir: Path, tmp_path: Path) -> ClientMaker:
    async def make(**overrides: Any) -> TestClient[Any, Any]:
        keys = tmp_path / "keys"
        keys.write_text(f"tester:{KEY}\n")
        settings = Settings(model=str(demo_dir), device="cpu", api_keys=str(keys), **overrides)
        return await aiohttp_client(init_app(settings))

    return make


def bytes_tensor(*elements: bytes) -> bytes:
    """A BYTES tensor in binary: each element its 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def json_request(image: bytes | None, questions: list[str], **extra: Any) -> dict[str, Any]:
    inputs = [{"name": "question", "datatype": "BYTES", "shape": [len(questions)], "data": questions}]
    if image is not None:
        inputs.insert(0, {"name": "image", "datatype": "BYTES", "shape": [1],
                          "data": [base64.b64encode(image).decode()]})
    return {"inputs": inputs, **extra}


def binary_request(image: bytes, questions: list[str], binary_output: bool = True) -> tuple[bytes, dict[str, str]]:
    blobs = [bytes_tensor(image), bytes_tensor(*(q.encode() for q in questions))]
    head = orjson.dumps({"id": "r1", "inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blobs[0])}},
        {"name": "question", "datatype": "BYTES", "shape": [len(questions)],
         "parameters": {"binary_data_size": len(blobs[1])}}],
        "outputs": [{"name": "answer", "parameters": {"binary_data": binary_output}}]})
    return head + b"".join(blobs), {**AUTH, "Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


async def v1_answers(client: TestClient[Any, Any], image: bytes, questions: list[str]) -> list[str]:
    r = await client.post("/v1/vqa", json={"image": base64.b64encode(image).decode(), "questions": questions},
                          headers=AUTH)
    assert r.status == 200, await r.text()
    answers: list[str] = (await r.json())["answers"]
    return answers


async def test_metadata_names_the_model_of_v1_models(make_client: ClientMaker) -> None:
    client = await make_client()
    server = await (await client.get("/v2", headers=AUTH)).json()
    assert server["name"] == "vqa-async" and "binary_tensor_data" in server["extensions"] and server["version"]
    listed = [m["id"] for m in (await (await client.get("/v1/models", headers=AUTH)).json())["data"]]
    assert listed == ["demo"]
    meta = await (await client.get("/v2/models/demo", headers=AUTH)).json()
    assert meta["name"] == "demo"
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("image", "BYTES"), ("question", "BYTES")}
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("answer", "BYTES")]
    ready = await client.get("/v2/models/demo/ready", headers=AUTH)
    assert ready.status == 200 and (await ready.json())["ready"] is True
    for path in ("/v2/health/live", "/v2/health/ready"):  # open, as the probes are; with the protocol's flag
        r = await client.get(path)
        assert r.status == 200 and (await r.json())[path.rpartition("/")[2]] is True


async def test_json_and_binary_inference_answer_as_v1_vqa(make_client: ClientMaker,
                                                           easy_vqa_images: list[Path]) -> None:
    client = await make_client()
    image = easy_vqa_images[0].read_bytes()
    expected = await v1_answers(client, image, QUESTIONS)

    r = await client.post(INFER, json=json_request(image, QUESTIONS, id="abc"), headers=AUTH)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["model_name"] == "demo" and body["id"] == "abc"
    assert body["outputs"] == [{"name": "answer", "datatype": "BYTES", "shape": [2], "data": expected}]
    assert body["parameters"]["image_id"] == r.headers["X-Image-Id"]

    raw, headers = binary_request(image, QUESTIONS)
    r = await client.post(INFER, data=raw, headers=headers)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == "application/octet-stream"
    data = await r.read()
    json_end = int(r.headers["Inference-Header-Content-Length"])
    head = orjson.loads(data[:json_end])
    (out,) = head["outputs"]
    assert out["shape"] == [2] and out["parameters"]["binary_data_size"] == len(data) - json_end and "data" not in out
    assert data[json_end:] == bytes_tensor(*(a.encode() for a in expected))

    raw, headers = binary_request(image, QUESTIONS, binary_output=False)  # binary in, JSON out
    r = await client.post(INFER, data=raw, headers=headers)
    assert (await r.json())["outputs"][0]["data"] == expected and "Inference-Header-Content-Length" not in r.headers


async def test_a_follow_up_names_its_image_by_id(make_client: ClientMaker, easy_vqa_images: list[Path]) -> None:
    client = await make_client()
    image = easy_vqa_images[1].read_bytes()
    first = await (await client.post(INFER, json=json_request(image, QUESTIONS[:1]), headers=AUTH)).json()
    image_id = first["parameters"]["image_id"]
    expected = await v1_answers(client, image, QUESTIONS[1:])
    by_param = await client.post(INFER, json=json_request(None, QUESTIONS[1:], parameters={"image_id": image_id}),
                                 headers=AUTH)
    by_header = await client.post(INFER, json=json_request(None, QUESTIONS[1:]), headers={**AUTH,
                                                                                         "X-Image-Id": image_id})
    for r in (by_param, by_header):
        assert r.status == 200, await r.text()
        assert (await r.json())["outputs"][0]["data"] == expected
    gone = await client.post(INFER, json=json_request(None, QUESTIONS[1:], parameters={"image_id": "ab" * 32}),
                             headers=AUTH)
    assert gone.status == 409 and (await gone.json())["code"] == "image_not_cached"


def _binary(head: dict[str, Any], tail: bytes, length: int | str | None = None) -> tuple[bytes, dict[str, str]]:
    raw = orjson.dumps(head)
    return raw + tail, {**AUTH, "Inference-Header-Content-Length": str(len(raw) if length is None else length)}


Q = {"name": "question", "datatype": "BYTES", "shape": [1], "data": ["what shape?"]}
IMAGE_B64 = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}  # b"hello": no picture


@pytest.mark.parametrize("body, status, code", [
    (b"not json", 400, "invalid_json"),
    (orjson.dumps({"inputs": "x"}), 400, "invalid_json"),
    (orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}, Q]}), 400,
     "invalid_base64"),
    (orjson.dumps({"inputs": [IMAGE_B64, Q]}), 400, "invalid_image"),
    (orjson.dumps({"inputs": [{**IMAGE_B64, "datatype": "FP32"}, Q]}), 400, "invalid_field"),
    (orjson.dumps({"inputs": [{**IMAGE_B64, "shape": [2]}, Q]}), 400, "invalid_field"),
    (orjson.dumps({"inputs": [IMAGE_B64, {**Q, "name": "prompt"}]}), 400, "invalid_field"),
    (orjson.dumps({"inputs": [IMAGE_B64]}), 400, "missing_question"),
    (orjson.dumps({"inputs": [Q]}), 400, "missing_image"),
    (orjson.dumps({"inputs": [IMAGE_B64, {**Q, "shape": [17], "data": ["q"] * 17}]}), 400, "too_many_questions"),
    (orjson.dumps({"inputs": [IMAGE_B64, {**Q, "data": [" "]}]}), 400, "empty_question"),
    (orjson.dumps({"inputs": [IMAGE_B64, Q], "outputs": [{"name": "logits"}]}), 400, "invalid_field"),
    (orjson.dumps({"inputs": [IMAGE_B64, Q], "parameters": {"image_id": "ab" * 32}}), 400, "image_and_image_id"),
    (orjson.dumps({"inputs": [Q], "parameters": {"image_id": "nope"}}), 400, "invalid_image_id"),
])
async def test_bad_input_is_the_protocols_error_with_our_code(make_client: ClientMaker, body: bytes, status: int,
                                                              code: str) -> None:
    client = await make_client()
    r = await client.post(INFER, data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == status, await r.text()
    err = await r.json()
    assert err["code"] == code and isinstance(err["error"], str) and err["error"]
    assert err["request_id"] == r.headers["X-Request-ID"]


@pytest.mark.parametrize("tail, length, code", [
    (bytes_tensor(b"x"), "abc", "invalid_field"),  # the header is not a length
    (bytes_tensor(b"x"), 10**6, "invalid_field"),  # past the body
    (bytes_tensor(b"x")[:-1], None, "invalid_field"),  # binary_data_size larger than what came
    (bytes_tensor(b"x") + b"!", None, "invalid_field"),  # bytes that belong to no input
    (struct.pack("<I", 9) + b"x", None, "invalid_field"),  # an element running past its tensor
])
async def test_bad_binary_data_is_refused(make_client: ClientMaker, tail: bytes, length: int | str | None,
                                          code: str) -> None:
    client = await make_client()
    size = len(bytes_tensor(b"x")) if tail != struct.pack("<I", 9) + b"x" else len(tail)
    head = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}},
                       Q]}
    raw, headers = _binary(head, tail, length)
    r = await client.post(INFER, data=raw, headers=headers)
    assert r.status == 400, await r.text()
    assert (await r.json())["code"] == code


async def test_keys_unknown_models_and_limits_answer_in_the_protocols_shape(make_client: ClientMaker,
                                                                           easy_vqa_images: list[Path]) -> None:
    client = await make_client(max_body_mb=0.001)
    image = easy_vqa_images[0].read_bytes()
    cases = [
        (await client.post(INFER, json=json_request(image, QUESTIONS)), 401, "unauthorized"),
        (await client.get("/v2", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized"),
        (await client.get("/v2/models/other", headers=AUTH), 404, "not_found"),
        (await client.get("/v2/models/other/ready", headers=AUTH), 404, "not_found"),
        (await client.post("/v2/models/other/infer", json=json_request(image, QUESTIONS), headers=AUTH), 404,
         "not_found"),
        (await client.get(INFER, headers=AUTH), 405, "method_not_allowed"),
        (await client.post(INFER, data=b"x" * 2000, headers=AUTH), 413, "body_too_large"),
    ]
    for r, status, code in cases:
        assert r.status == status, (r.url, await r.text())
        err = await r.json()
        assert err["code"] == code and isinstance(err["error"], str), err
