"""The application factory. Lifetimes (model, executor thread, batcher task, SIGHUP) live in `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import aiohttp_jinja2
import jinja2
from aiohttp import web

from vqa_async.config import Settings
from vqa_async.core.service import VqaService
from vqa_async.http import handlers, open_inference, openai_api, page
from vqa_async.http.accesslog import AccessLog
from vqa_async.http.app_keys import ACCESS_LOG, AUTH, INFLIGHT, METRICS, SERVICE, SETTINGS
from vqa_async.http.auth import Auth, KeyRing
from vqa_async.http.middleware import middlewares
from vqa_async.http.quota import InflightLimit
from vqa_async.http.security import add_security_headers
from vqa_async.metrics import SUM_ROUTE, Metrics, multiprocess_dir

log = logging.getLogger(__name__)

# multipart framing around the largest accepted upload
MULTIPART_SLACK = 64 * 1024


def init_app(settings: Settings) -> web.Application:
    access_log = AccessLog(settings.access_log, settings.worker_name)
    app = web.Application(middlewares=middlewares(access_log.finish),
                          client_max_size=settings.max_body_bytes + MULTIPART_SLACK)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SERVICE] = VqaService(settings, app[METRICS])
    app[METRICS].watch_waiting(app[SERVICE].waiting)
    app[AUTH] = Auth(KeyRing(settings.api_keys) if settings.api_keys else None, settings.trusted_networks,
                     settings.metrics_need_key)
    app[ACCESS_LOG] = access_log
    app[INFLIGHT] = InflightLimit(settings.max_inflight_per_client)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(page.TEMPLATES), autoescape=True)
    app.router.add_post("/v1/vqa", handlers.vqa_v1)
    app.router.add_post("/vqa", handlers.vqa_legacy)
    app.router.add_get("/", page.page)
    app.router.add_post("/", page.page_post)
    app.router.add_get("/static/page.js", page.script)
    app.router.add_get("/static/page.css", page.style)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/v2/health/live", open_inference.live)  # KServe v2's names for the same probes
    app.router.add_get("/v2/health/ready", open_inference.ready)
    openai_api.add_routes(app)  # POST /v1/chat/completions, GET /v1/models
    open_inference.add_routes(app)  # GET /v2, /v2/models/{name}[/ready], POST /v2/models/{name}/infer
    app.router.add_get("/metrics", handlers.metrics)
    if multiprocess_dir():  # a worker of `vqa-async cluster`: the front's /metrics comes here
        app.router.add_get(SUM_ROUTE, handlers.metrics_summed)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.on_response_prepare.append(add_security_headers)
    app.cleanup_ctx.append(_service_ctx)
    app.cleanup_ctx.append(_sighup_ctx)
    return app


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[SERVICE]
    await service.start()
    yield
    await service.stop()


def reload_files(app: web.Application) -> None:
    """SIGHUP: re-read the API keys (a bad file keeps the old ones) and reopen the access log file."""
    if (keys := app[AUTH].keys) is not None:
        keys.reload()
    app[ACCESS_LOG].reopen()


async def _sighup_ctx(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reload_files, app)
        installed = True
        if (keys := app[AUTH].keys) is not None:
            keys.reload_if_changed()
    except (NotImplementedError, RuntimeError, ValueError) as e:  # not the main thread, or no signals here
        log.warning("SIGHUP will not reload the API keys here: %s", e)
        installed = False
    yield
    if installed:
        loop.remove_signal_handler(signal.SIGHUP)
    app[ACCESS_LOG].close()


def serve(settings: Settings) -> None:
    """One `vqa-async serve` process, until SIGTERM: what the command line and the cluster's warm spare run."""
    from vqa_async.http import server
    from vqa_async.otel import hooks

    hooks.start_from_env(settings.worker_name)  # OpenTelemetry traces, when an OTLP endpoint is configured
    app = init_app(settings)
    if settings.loop == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    scheme = "https" if settings.tls_cert else "http"
    where = f"unix:{settings.unix_socket}" if settings.unix_socket else f"{scheme}://{settings.host}:{settings.port}"
    top = logging.getLogger("vqa_async")
    top.info("serving on %s", where)
    # SIGTERM/SIGINT: stop accepting, let the handlers in flight (and so everything queued) finish, then the
    # cleanup_ctx stops the batcher and the model thread. A client that disconnects cancels its handler, so
    # its work is skipped before it reaches the model.
    server.run(app, settings, loop)
    top.info("stopped")
