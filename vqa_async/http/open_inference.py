"""The Open Inference Protocol (KServe v2, Triton's HTTP API): `GET /v2`, `GET /v2/models/{name}`,
`GET /v2/models/{name}/ready` and `POST /v2/models/{name}/infer`, over the same path as /v1/vqa.

The tensors (BYTES `image` and `question` in, BYTES `answer` out; JSON with base64 for the image, or Triton's
binary-data extension) are read and written in http/v2_tensors.py. An inference goes through the same
middlewares (keys, request ids, access log, metrics) and `handlers.ask` (per-client quota, fair share, the batcher,
the image cache) as /v1/vqa. The model's name is the one /v1/models lists; another name is 404 not_found.
Errors are the protocol's shape, `{"error": "<message>"}`, with our stable `code` and the `request_id` beside it
(errors.v2_error_body), so that tritonclient and KServe's SDK show the message and a program can still branch on
the code. Every answer names its image (`X-Image-Id`, and `parameters.image_id`); a follow-up sends that id as
`parameters.image_id` or the X-Image-Id header (which the cluster's HAProxy routes on) and no `image` input.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from vqa_async import __version__
from vqa_async.http import handlers
from vqa_async.http.app_keys import SERVICE, SETTINGS
from vqa_async.http.errors import ApiError, json_response
from vqa_async.http.handlers import ask, image_header
from vqa_async.http.parse import VqaInput, check_length, check_questions, named_image, within_body_timeout
from vqa_async.http.v2_tensors import ANSWER, BYTES, HEADER_LENGTH, IMAGE, QUESTION, infer_response, read_infer_request

PREFIX = "/v2"
SERVER_NAME = "vqa-async"
PLATFORM = "vqa-async_mplug"  # the protocol's `platform`: what runs the model
EXTENSIONS = ["binary_tensor_data"]  # Triton's name for the binary-data extension
MODEL_METADATA_ROUTE = PREFIX + "/models/{name}"


def model_name(request: web.Request) -> str:
    """The served model's name, when the path names it: 503 while loading, 404 for another name."""
    loaded = request.app[SERVICE].loaded
    if loaded is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "2"})
    asked = request.match_info["name"]
    if asked != loaded.name:
        raise ApiError(404, "not_found", f"unknown model '{asked[:100]}': this server serves '{loaded.name}' "
                       "(GET /v1/models)")
    return loaded.name


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: web.Request) -> web.Response:
    name = model_name(request)
    settings = request.app[SETTINGS]
    return json_response({
        "name": name, "platform": PLATFORM,
        "inputs": [{"name": IMAGE, "datatype": BYTES, "shape": [1]},
                   {"name": QUESTION, "datatype": BYTES, "shape": [-1]}],
        "outputs": [{"name": ANSWER, "datatype": BYTES, "shape": [-1]}],
        "parameters": {"max_questions": settings.max_questions, "max_question_chars": settings.max_question_chars}})


async def model_ready(request: web.Request) -> web.Response:
    name = model_name(request)
    if problem := request.app[SERVICE].readiness_problem():
        raise ApiError(503, "not_ready", problem, {"Retry-After": "2"})
    return json_response({"name": name, "ready": True})


async def infer(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    name = model_name(request)
    check_length(request, settings)
    body = await within_body_timeout(settings, request.read())
    req = read_infer_request(body, request.headers.get(HEADER_LENGTH))
    questions = check_questions(req.questions, settings)
    named = named_image(request, req.image_id, sent_image=req.image is not None)
    if named is None and req.image is None:
        raise ApiError(400, "missing_image", "add an 'image' input (BYTES, one element: the picture's bytes), or "
                       "name a previous answer's image with parameters.image_id")
    out = await ask(request, VqaInput(req.image or b"", questions, plural=True, image_id=named))
    params: dict[str, Any] = {"image_id": out.image_id, "queue_ms": out.queue_ms, "compute_ms": out.compute_ms,
                              "batch_size": out.batch_size}
    payload, json_length = infer_response(name, req, [a.text for a in out.answers], params)
    headers = image_header(out)
    if json_length is None:
        return web.Response(body=payload, content_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(json_length)
    return web.Response(body=payload, content_type="application/octet-stream", headers=headers)


async def live(request: web.Request) -> web.Response:
    """/v2/health/live: /healthz's answer, with the protocol's `live` (KServe's SDK reads it)."""
    return await _with_flag(await handlers.healthz(request), "live")


async def ready(request: web.Request) -> web.Response:
    """/v2/health/ready: /readyz's answer, with the protocol's `ready`."""
    return await _with_flag(await handlers.readyz(request), "ready")


async def _with_flag(resp: web.Response, flag: str) -> web.Response:
    assert isinstance(resp.body, bytes)
    body = orjson.loads(resp.body)
    body[flag] = resp.status == 200
    return json_response(body, resp.status)


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX, server_metadata)
    app.router.add_get(MODEL_METADATA_ROUTE, model_metadata)
    app.router.add_get(MODEL_METADATA_ROUTE + "/ready", model_ready)
    app.router.add_post(MODEL_METADATA_ROUTE + "/infer", infer)
