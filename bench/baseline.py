"""The tutorial's way, as a bench system: every request answered alone, no batching, behind an aiohttp front.

For each request: ModelScope's own `MPlugPreprocessor`, then the model's own `forward(train=False)`, one request
at a time on one thread — what `pipeline(Tasks.visual_question_answering)` does (the unmodified pipeline cannot
load a serving directory or the narrowed demo model, so it is reproduced step by step).

    python -m bench.baseline --model DIR --port 8100 [--torch-threads N]

The launcher (bench.lib.systems) gives it the same torch threads and OMP_WAIT_POLICY as every other system.
"""

from __future__ import annotations

import argparse
import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import orjson
import torch
from aiohttp import web
from PIL import Image


def build(model_dir: str | None, device: str) -> web.Application:
    from vqa_async.testing.pipeline_support import install_stand_ins  # ModelScope's preprocessor module imports decord

    install_stand_ins()
    from modelscope.preprocessors.multi_modal import MPlugPreprocessor

    from vqa_async.model.loader import load_model

    loaded = load_model(model_dir, device=device)
    pre = MPlugPreprocessor(str(loaded.model_dir))
    tok = loaded.model.tokenizer
    one = ThreadPoolExecutor(max_workers=1)

    def answer(image: bytes, question: str) -> str:
        img = Image.open(io.BytesIO(image)).convert("RGB")
        inputs = pre({"image": img, "text": question})
        with torch.no_grad():
            q = inputs["question"].to(loaded.device)
            topk, _ = loaded.model(inputs["image"].to(loaded.device), q, train=False)
        return str(tok.decode(topk[0][0], skip_special_tokens=True))

    async def vqa(request: web.Request) -> web.Response:
        form = await request.post()
        f = form["image"]
        data = b""
        if isinstance(f, web.FileField):
            data = f.file.read()
            f.file.close()
        text = await asyncio.get_running_loop().run_in_executor(one, answer, data, str(form["question"]))
        return web.Response(body=orjson.dumps({"answer": text, "batch_size": 1}), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    app = web.Application(client_max_size=20 * 2**20)
    app.router.add_post("/v1/vqa", vqa)
    app.router.add_get("/readyz", ready)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch's intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    web.run_app(build(args.model, args.device), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
