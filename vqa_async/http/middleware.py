"""Every middleware, in the order a request meets them (`middlewares`), each in a few lines (the outermost,
tracing_middleware, lives with the request ids and spans it opens in tracing.py): what they share
with the handlers is in context.py (request keys) and app_keys.py (app state); the helpers they call stay
beside their subject (tracing.py: request ids; errors.py: error bodies; auth.py: keys and addresses)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from vqa_async.http.app_keys import AUTH, METRICS
from vqa_async.http.auth import client_address, presented_keys, unauthorized
from vqa_async.http.context import CLIENT, ERROR_CODE, Client
from vqa_async.http.errors import (
    ApiError,
    error_body,
    json_response,
    openai_error_body,
    to_api_error,
    uses_openai_shape,
    uses_v2_shape,
    v2_error_body,
)
from vqa_async.http.tracing import Finisher, Handler, current_request_id, tracing_middleware
from vqa_async.metrics import SUM_ROUTE

log = logging.getLogger(__name__)

def middlewares(finish: Finisher) -> list[Middleware]:
    """Outermost first: the request id is set before anything logs, and the access log (`finish`) sees the final
    status; the key is checked inside the error middleware so that a refusal is a JSON 401 with that id."""
    return [tracing_middleware(finish), metrics_middleware, error_middleware, auth_middleware]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests by route and status, and latency, for every route but /metrics itself."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    if route in ("/metrics", SUM_ROUTE):
        return await handler(request)
    t0 = time.monotonic()
    m = request.app[METRICS]
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client left
        raise
    finally:
        m.requests.labels(route, str(status)).inc()
        if request.app[AUTH].keys is not None and (client := request.get(CLIENT)) is not None:
            m.client_requests.labels(client.name, str(status)).inc()
        m.latency.labels(route).observe(time.monotonic() - t0)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = to_api_error(e)
    except ApiError as e:
        err = e
    except Exception as e:  # noqa: BLE001 - the one place that turns the unexpected into a logged 500
        err = to_api_error(e)
    request[ERROR_CODE] = err.code  # for the access log
    if request.path == "/vqa":  # the tutorial's response shape
        body: object = {"status": "error", "message": err.message, "code": err.code,
                        "request_id": current_request_id()}
    elif uses_openai_shape(request.path):
        body = openai_error_body(err, err.headers.get("X-Error-Id"))
    elif uses_v2_shape(request.path):
        body = v2_error_body(err, err.headers.get("X-Error-Id"))
    else:
        body = error_body(err.code, err.message, err.headers.get("X-Error-Id"))
    return json_response(body, err.status, err.headers)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who asks (request[CLIENT]): the API key's name, or without keys the client's address."""
    auth = request.app[AUTH]
    if auth.keys is None:
        request[CLIENT] = Client(client_address(request, auth.trusted))
        return await handler(request)
    if auth.is_open(request):  # a credential here is not checked: probes and the page answer anyway
        return await handler(request)
    clients = {auth.keys.find(k) for k in presented_keys(request)}
    if not clients:
        raise unauthorized("send an API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    client = clients.pop()
    if client is None or clients:  # an unknown key, or two keys of different clients
        log.info("refused: an unknown API key (%s %s)", request.method, request.path)
        raise unauthorized("that API key is not valid")
    request[CLIENT] = client
    return await handler(request)
