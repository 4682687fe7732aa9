"""The Open Inference Protocol through the real clients of that world: Triton's `tritonclient.http` (binary data on
and off) and KServe's Python SDK (`InferenceRESTClient`, protocol v2), against a real `vqa-async serve` with keys on
and through a real cluster (HAProxy in front, two workers): the same answers as POST /v1/vqa for 100 easy-VQA
questions, the metadata and readiness calls, follow-ups routed to the worker holding the image, and refusals in the
protocol's error shape with our stable code, as each client reports them."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from client_support import API_KEY, Serve, direct_post, serve
from cluster_support import start_cluster, stop_cluster
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from tritonclient.utils import InferenceServerException

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "demo"
Case = tuple[bytes, list[str]]


@pytest.fixture(scope="module")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    yield from serve(demo_dir, tmp_path_factory.mktemp("v2_serve"))


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    """The first 100 easy-VQA test questions, asked per image (several questions in one request)."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    grouped: dict[int, list[str]] = {}
    for q, i in zip(questions[:100], image_ids[:100], strict=True):
        grouped.setdefault(i, []).append(q)
    out = [(Path(paths[i]).read_bytes(), qs[at:at + 16]) for i, qs in grouped.items() for at in range(0, len(qs), 16)]
    assert sum(len(qs) for _, qs in out) == 100
    return out


def v1_answers(url: str, cases: list[Case]) -> list[list[str]]:
    out = []
    for image, qs in cases:
        body = direct_post(url, image, qs)
        out.append(body["answers"] if len(qs) > 1 else [body["answer"]])
    return out


def _text(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]


def triton_answers(url: str, cases: list[Case], binary: bool) -> list[list[str]]:
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    out = []
    try:
        for image, qs in cases:
            img = triton.InferInput("image", [1], "BYTES")
            # Without binary data a BYTES tensor is JSON strings: the image goes as base64.
            img.set_data_from_numpy(np.array([image if binary else base64.b64encode(image)], dtype=np.object_),
                                    binary_data=binary)
            question = triton.InferInput("question", [len(qs)], "BYTES")
            question.set_data_from_numpy(np.array([q.encode() for q in qs], dtype=np.object_), binary_data=binary)
            # A copy: tritonclient adds Inference-Header-Content-Length to the dict it is given.
            result = client.infer(MODEL, [img, question], headers=dict(AUTH),
                                  outputs=[triton.InferRequestedOutput("answer", binary_data=binary)])
            assert result.get_response()["model_name"] == MODEL
            out.append(_text(result.as_numpy("answer")))
    finally:
        client.close()
    return out


def kserve_answers(url: str, cases: list[Case], binary: bool) -> list[list[str]]:
    async def ask() -> list[list[str]]:
        out = []
        async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=120, retries=0)) as client:
            assert await client.is_server_ready(url, headers=AUTH) is True
            assert await client.is_model_ready(url, MODEL, headers=AUTH) is True
            for image, qs in cases:
                if binary:
                    img = InferInput("image", [1], "BYTES")
                    img.set_data_from_numpy(np.array([image], dtype=np.object_), binary_data=True)
                    question = InferInput("question", [len(qs)], "BYTES")
                    question.set_data_from_numpy(np.array([q.encode() for q in qs], dtype=np.object_),
                                                 binary_data=True)
                else:
                    img = InferInput("image", [1], "BYTES", data=[base64.b64encode(image).decode()])
                    question = InferInput("question", [len(qs)], "BYTES", data=qs)
                request = InferRequest(MODEL, [img, question],
                                       request_outputs=[RequestedOutput("answer", {"binary_data": binary})])
                response = await client.infer(url, request, model_name=MODEL, headers=dict(AUTH))
                out.append(_text(response.outputs[0].as_numpy()))
        return out

    return asyncio.run(ask())


def test_tritonclient_and_kserve_get_v1_vqas_answers(server: Serve, cases: list[Case]) -> None:
    expected = v1_answers(server.url, cases)
    assert triton_answers(server.url, cases, binary=True) == expected
    assert triton_answers(server.url, cases, binary=False) == expected
    assert kserve_answers(server.url, cases, binary=False) == expected
    assert kserve_answers(server.url, cases[:3], binary=True) == expected[:3]
    routes = {line["route"] for line in server.log_lines()}
    assert "/v2/models/{name}/infer" in routes  # counted and logged like any answering route (by its pattern)


def test_tritonclient_metadata_readiness_and_errors(server: Serve, easy_vqa_images: list[Path]) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL, headers=AUTH)
        assert not client.is_model_ready("resnet50", headers=AUTH)
        assert client.get_server_metadata(headers=AUTH)["name"] == "vqa-async"
        meta = client.get_model_metadata(MODEL, headers=AUTH)
        assert [t["name"] for t in meta["inputs"]] == ["image", "question"]

        def refused(model: str, image: bytes, headers: dict[str, str]) -> InferenceServerException:
            img = triton.InferInput("image", [1], "BYTES")
            img.set_data_from_numpy(np.array([image], dtype=np.object_))
            question = triton.InferInput("question", [1], "BYTES")
            question.set_data_from_numpy(np.array([b"what shape?"], dtype=np.object_))
            with pytest.raises(InferenceServerException) as e:
                client.infer(model, [img, question], headers=dict(headers))
            return e.value

        good = easy_vqa_images[0].read_bytes()
        # No outputs named: tritonclient asks for every output in binary (parameters.binary_data_output).
        img = triton.InferInput("image", [1], "BYTES")
        img.set_data_from_numpy(np.array([good], dtype=np.object_))
        asked = ["what shape is in the image?", "what color is the shape?"]
        question = triton.InferInput("question", [1, 2], "BYTES")
        question.set_data_from_numpy(np.array([[q.encode() for q in asked]], dtype=np.object_))
        result = client.infer(MODEL, [img, question], headers=dict(AUTH))
        assert result.as_numpy("answer").shape == (1, 2)
        assert _text(result.as_numpy("answer")) == direct_post(server.url, good, asked)["answers"]
        for err, status, words in ((refused(MODEL, b"not a picture", AUTH), "400", "image"),
                                   (refused("resnet50", good, AUTH), "404", "unknown model"),
                                   (refused(MODEL, good, {"Authorization": "Bearer wrong"}), "401", "key")):
            assert err.status() == status and words in err.message(), (err.status(), err.message())
    finally:
        client.close()


def test_kserve_reports_the_protocols_error(server: Serve) -> None:
    async def refused() -> httpx.HTTPStatusError:
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0)) as client:
            request = InferRequest(MODEL, [InferInput("image", [1], "BYTES", data=["%%% not base64"]),
                                           InferInput("question", [1], "BYTES", data=["what shape?"])])
            with pytest.raises(httpx.HTTPStatusError) as e:
                await client.infer(server.url, request, model_name=MODEL, headers=dict(AUTH))
            return e.value

    err = asyncio.run(refused())
    assert err.response.status_code == 400
    body = err.response.json()
    assert body["code"] == "invalid_base64" and "base64" in body["error"] and "base64" in str(err)


def raw_error(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json", **headers})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    return e.value.code, json.loads(e.value.read())


@pytest.mark.slow
def test_through_the_cluster(tmp_path: Path, demo_dir: Path, cases: list[Case]) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"tester:{API_KEY}\n")
    cl = start_cluster(tmp_path, demo_dir, "--api-keys", str(keys), workers=2)
    try:
        expected = v1_answers(cl.url, cases)
        assert triton_answers(cl.url, cases, binary=True) == expected
        assert triton_answers(cl.url, cases, binary=False) == expected
        assert kserve_answers(cl.url, cases, binary=False) == expected
        # A follow-up by the answer's image id (the X-Image-Id header, which HAProxy routes on) reaches the worker
        # that holds the image, every time; the other would answer 409 image_not_cached.
        image, qs = cases[0]
        body = json.dumps({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]},
            {"name": "question", "datatype": "BYTES", "shape": [1], "data": qs[:1]}]}).encode()
        req = urllib.request.Request(cl.url + f"/v2/models/{MODEL}/infer", data=body, headers=AUTH)
        with urllib.request.urlopen(req, timeout=60) as r:
            image_id, holder = r.headers["X-Image-Id"], r.headers["X-Served-By"]
        follow_up = json.dumps({"inputs": [{"name": "question", "datatype": "BYTES", "shape": [len(qs)],
                                            "data": qs}]}).encode()
        for _ in range(6):
            req = urllib.request.Request(cl.url + f"/v2/models/{MODEL}/infer", data=follow_up,
                                         headers={**AUTH, "X-Image-Id": image_id})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.headers["X-Served-By"] == holder
                assert json.loads(r.read())["outputs"][0]["data"] == expected[0]
        status, err = raw_error(cl.url, f"/v2/models/{MODEL}/infer", b"{}", AUTH)
        assert status == 400 and err["code"] == "invalid_json" and err["error"]
        status, err = raw_error(cl.url, "/v2/models/other/infer", follow_up, AUTH)
        assert status == 404 and err["code"] == "not_found"
    finally:
        stop_cluster(cl)
