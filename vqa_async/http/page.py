"""The upload page. With JavaScript it posts to /v1/vqa and shows the answer in place; without, the form posts
here and the same template renders the answer."""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import web

from vqa_async.http.auth import form_client
from vqa_async.http.errors import ApiError
from vqa_async.http.handlers import ask
from vqa_async.http.keys import AUTH, SERVICE, SETTINGS
from vqa_async.http.parse import read_vqa_input


def _context(request: web.Request, **extra: object) -> dict[str, object]:
    s = request.app[SETTINGS]
    return {"model": request.app[SERVICE].model_name, "max_body_mb": s.max_body_mb,
            "max_question_chars": s.max_question_chars, "keys_required": request.app[AUTH].keys is not None,
            **extra}


async def page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("index.html", request, _context(request))


async def page_post(request: web.Request) -> web.Response:
    question = ""
    try:
        vqa = await read_vqa_input(request, request.app[SETTINGS])
        question = vqa.questions[0]
        form_client(request, vqa.api_key)
        out = await ask(request, vqa)
    except ApiError as e:
        resp = aiohttp_jinja2.render_template(
            "index.html", request, _context(request, question=question, error=e.message, error_code=e.code),
            status=e.status)
        resp.headers.update(e.headers)  # Retry-After, WWW-Authenticate
        return resp
    return aiohttp_jinja2.render_template("index.html", request, _context(
        request, question=question, answer=out.answers[0].text, queue_ms=out.queue_ms, compute_ms=out.compute_ms,
        batch_size=out.batch_size))
