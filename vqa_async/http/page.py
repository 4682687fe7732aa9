"""The upload page. With JavaScript (templates/page.js, served at /static/page.js) it shrinks a large photo in
the browser, posts it to /v1/vqa and shows the answer in place (a further question about the same picture names it
by the answer's `image_id` instead of sending it again); without, the form posts the original here and the
same template renders the answer. The page has no inline script or style (templates/page.css), as the
Content-Security-Policy requires (security.py); a form post from another site is refused.

On a model whose directory says what it can answer (`examples/examples.json`: the shipped demo model's, written
by tools/demo_examples.py) the page says so and offers its example pictures, one click each; on any other model
it shows neither."""

from __future__ import annotations

import base64
import functools
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiohttp_jinja2
from aiohttp import web

from vqa_async.http.app_keys import AUTH, SERVICE, SETTINGS
from vqa_async.http.auth import form_client
from vqa_async.http.errors import ApiError
from vqa_async.http.handlers import ask, image_header
from vqa_async.http.parse import read_vqa_input
from vqa_async.http.security import refuse_cross_site

# The page's template and its static files: templates/ at the repository's top level, in the wheel as the package
# vqa_async.templates (pyproject.toml maps it).
TEMPLATES = Path(str(resources.files("vqa_async.templates")))
EXAMPLES = Path("examples") / "examples.json"  # in a model directory

log = logging.getLogger(__name__)

STATIC_TYPES = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class Example:
    file: str
    question: str
    src: str  # a data: URL: the Content-Security-Policy allows data: images, and no route is needed
    alt: str


@dataclass(frozen=True)
class Guide:
    """What a model can answer (easy-VQA's shapes and colours) and pictures to try."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    examples: tuple[Example, ...]


@functools.cache
def guide(model_dir: Path) -> Guide | None:
    """The model directory's guide, read once; None when it has none (any model but the demo)."""
    path = model_dir / EXAMPLES
    if not path.is_file():
        return None
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
        examples = tuple(Example(ex["file"], ex["question"], "data:image/png;base64," + base64.b64encode(
            (path.parent / Path(ex["file"]).name).read_bytes()).decode(), ex.get("source", ex["file"]))
            for ex in facts["examples"])
        return Guide(tuple(facts["shapes"]), tuple(facts["colours"]), examples)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a broken guide costs the page its examples only
        log.warning("the page shows no examples: %s is unreadable: %s", path, e)
        return None


def _context(request: web.Request, **extra: object) -> dict[str, object]:
    s = request.app[SETTINGS]
    service = request.app[SERVICE]
    # The script shrinks photos to 2x this on their longer side; 0 (model not loaded yet) sends them as they are.
    image_res = service.loaded.image_res if service.loaded is not None else 0
    return {"model": service.model_name, "max_body_mb": s.max_body_mb, "image_res": image_res,
            "max_question_chars": s.max_question_chars,
            "keys_required": request.app[AUTH].keys is not None,
            "guide": guide(service.loaded.model_dir) if service.loaded is not None else None, **extra}


async def script(request: web.Request) -> web.FileResponse:
    return _static("page.js")


async def style(request: web.Request) -> web.FileResponse:
    return _static("page.css")


def _static(name: str) -> web.FileResponse:
    return web.FileResponse(TEMPLATES / name, headers={"Content-Type": STATIC_TYPES[name], "Cache-Control": "no-cache"})


async def page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("index.html", request, _context(request))


async def page_post(request: web.Request) -> web.Response:
    question = ""
    try:
        refuse_cross_site(request)  # before the body is read: nothing of a forged post is used
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
    resp = aiohttp_jinja2.render_template("index.html", request, _context(
        request, question=question, answer=out.answers[0].text, queue_ms=out.queue_ms, compute_ms=out.compute_ms,
        batch_size=out.batch_size))
    resp.headers.update(image_header(out))
    return resp
