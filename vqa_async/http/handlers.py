"""The API handlers, readable top to bottom: read the input, ask the service, shape the answer."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vqa_async.batching.runner import ItemFailed, ModelFailing
from vqa_async.core.adapter import ImageNotCached
from vqa_async.core.service import NotReady, Outcome, Overloaded
from vqa_async.http.app_keys import INFLIGHT, METRICS, SERVICE, SETTINGS
from vqa_async.http.context import CLIENT, OUTCOME, QUESTIONS, Client
from vqa_async.http.errors import ApiError, error_body, json_response
from vqa_async.http.openapi import openapi_spec
from vqa_async.http.parse import IMAGE_ID_HEADER, VqaInput, read_vqa_input
from vqa_async.metrics import multiprocess_dir, summed
from vqa_async.model.preprocess import ImageError


async def ask(request: web.Request, vqa: VqaInput) -> Outcome:
    """The service's answer, or the ApiError a client should see."""
    client = request.get(CLIENT) or Client("-")
    request[QUESTIONS] = len(vqa.questions)
    try:
        with request.app[INFLIGHT].hold(client.name):
            out = await request.app[SERVICE].ask(None if vqa.image_id else vqa.image, vqa.questions, client.name,
                                                 client.weight, image_id=vqa.image_id, scope=client.scope)
        request[OUTCOME] = out  # for Server-Timing and the access log
        return out
    except ImageError as e:
        raise ApiError(413 if e.code == "image_too_large" else 400, e.code, e.message) from e
    except ImageNotCached as e:  # not retried by the cluster: another worker holds it no more than this one
        raise ApiError(409, "image_not_cached", f"image {vqa.image_id or e.image_id} is not cached here for you "
                       "(evicted, this server restarted, or another key's image): send the image again") from e
    except Overloaded as e:
        raise ApiError(503, "overloaded", "too many requests are waiting; retry shortly",
                       {"Retry-After": "1"}) from e
    except NotReady as e:
        raise ApiError(503, "not_ready", str(e), {"Retry-After": "2"}) from e
    except TimeoutError as e:
        raise ApiError(504, "timeout", f"no answer within {request.app[SETTINGS].timeout_s:g} s") from e
    except ModelFailing as e:  # every request of its batch failed: another process may answer it
        raise ApiError(503, "not_ready", "the model is failing every request here; retry shortly",
                       {"Retry-After": "1", "X-Error-Id": e.error_id}) from e
    except ItemFailed as e:
        raise ApiError(500, "model_error", str(e), {"X-Error-Id": e.error_id}) from e


async def vqa_v1(request: web.Request) -> web.Response:
    vqa = await read_vqa_input(request, request.app[SETTINGS])
    out = await ask(request, vqa)
    body: dict[str, object] = {"answers": [a.text for a in out.answers]} if vqa.plural else \
        {"answer": out.answers[0].text}
    body.update(model=request.app[SERVICE].model_name, queue_ms=out.queue_ms, compute_ms=out.compute_ms,
                batch_size=out.batch_size, image_id=out.image_id)
    return json_response(body, headers=image_header(out))


def image_header(out: Outcome) -> dict[str, str]:
    """The answered image's id, for follow-ups: the cluster's HAProxy learns from it which worker holds it."""
    return {IMAGE_ID_HEADER: out.image_id}


async def vqa_legacy(request: web.Request) -> web.Response:
    """The tutorial's `/vqa`: multipart image + question -> {"status": "success", "answer", "model_used"}."""
    vqa = await read_vqa_input(request, request.app[SETTINGS])
    out = await ask(request, vqa)
    return json_response({"status": "success", "answer": out.answers[0].text,
                          "model_used": request.app[SERVICE].model_name}, headers=image_header(out))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 when only a restart helps (a hung model call, a dead model thread or batcher)."""
    if problem := request.app[SERVICE].liveness_problem():
        return json_response(error_body("not_alive", problem), 503)
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while loading, when not alive, or while the model fails every request (sick)."""
    service = request.app[SERVICE]
    if problem := service.readiness_problem():
        return json_response(error_body("not_ready", problem), 503)
    # image_res: the model's input side; clients (vqa_async.client, the page) shrink photos to twice it
    return json_response({"status": "ready", "model": service.model_name,
                          "queue_depth": service.collector.pending(),
                          "image_res": service.loaded.image_res if service.loaded is not None else None})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def metrics_summed(request: web.Request) -> web.Response:
    """Every worker of the cluster, summed (only under `vqa-async cluster`: vqa_async/metrics.py)."""
    path = multiprocess_dir()
    assert path is not None  # the route exists only then
    body = await asyncio.to_thread(summed, path)  # reads a file per process: not on the event loop
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_spec(request.app[SETTINGS]))
