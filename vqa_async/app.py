"""The application factory. Lifetimes (model, executor thread, batcher task) live in `cleanup_ctx`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from vqa_async.batching.service import VqaService
from vqa_async.config import Settings
from vqa_async.http import handlers, page
from vqa_async.http.errors import error_middleware
from vqa_async.http.keys import METRICS, SERVICE, SETTINGS
from vqa_async.metrics import Metrics

# templates/ at the repository's top level, shipped in the wheel as this package (pyproject.toml).
TEMPLATES = Path(str(resources.files("vqa_async.templates")))

# multipart framing around the largest accepted upload
MULTIPART_SLACK = 64 * 1024


def init_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[handlers.metrics_middleware, error_middleware],
                          client_max_size=settings.max_body_bytes + MULTIPART_SLACK)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[SERVICE] = VqaService(settings, app[METRICS])
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    app.router.add_post("/v1/vqa", handlers.vqa_v1)
    app.router.add_post("/vqa", handlers.vqa_legacy)
    app.router.add_get("/", page.page)
    app.router.add_post("/", page.page_post)
    app.router.add_get("/static/page.js", page.script)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.cleanup_ctx.append(_service_ctx)
    return app


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[SERVICE]
    await service.start()
    yield
    await service.stop()
