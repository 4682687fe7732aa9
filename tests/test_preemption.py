"""Preemption: a light client's request is answered inside a running bulk batch, between its layers.

Through a real `serve` (the model slowed by the test-only fault injector, so that the order is certain), and on
the real model (a batch interrupted at every layer and step gives exactly the answers it gives alone).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import torch
from cluster_support import faulty_env, set_faults

from vqa_async.cluster.supervisor import free_port
from vqa_async.model.answer import Answerer
from vqa_async.model.loader import LoadedModel
from vqa_async.model.preprocess import EncodedQuestions, UploadPixels
from vqa_async.tools.loadgen import wait_ready

SLOW_S = 1.0  # each model call sleeps this long first (tests/faults/sitecustomize.py)


def _form(image: bytes, questions: list[str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", image, filename="a.png", content_type="image/png")
    for q in questions:
        form.add_field("question", q)
    return form


def _bulk_then_small(url: str, calls: Path, bulk_image: bytes, small_image: bytes) -> list[str]:
    """A bulk client's 4-question request, then, while it runs, a light client's single question (told apart by
    X-Forwarded-For, which serve trusts from loopback). Returns the clients in the order they were answered."""

    async def scenario() -> list[str]:
        order: list[str] = []
        async with aiohttp.ClientSession() as s:
            async def ask(name: str, address: str, form: aiohttp.FormData) -> None:
                async with s.post(url + "/v1/vqa", data=form, headers={"X-Forwarded-For": address}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                order.append(name)

            bulk = asyncio.create_task(ask("bulk", "198.51.100.1", _form(bulk_image, [
                "what color is the shape?", "what shape is in the image?", "is there a circle?", "is it blue?"])))
            while not calls.exists():  # until the bulk batch is in its (slowed) model call
                await asyncio.sleep(0.02)
            await ask("small", "198.51.100.2", _form(small_image, ["what shape is in the image?"]))
            await bulk
        return order

    return asyncio.run(scenario())


@pytest.mark.parametrize("share, first", [("0.5", "small"), ("0", "bulk")])
def test_a_light_clients_request_is_answered_inside_a_running_bulk_batch(
        share: str, first: str, demo_dir: Path, easy_vqa_images: list[Path], tmp_path: Path) -> None:
    """With the default --preempt-share the single question is answered at the bulk batch's first layer boundary
    after it arrives, before the bulk request; with 0 (the behaviour before preemption) it waits for the batch."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fault_file = tmp_path / "faults.json"
    env = dict(os.environ, **faulty_env(fault_file))
    proc = subprocess.Popen([sys.executable, "-m", "vqa_async.cli", "serve", "--model", str(demo_dir), "--port",
                             str(port), "--preempt-share", share, "--access-log", "off"], env=env)
    try:
        wait_ready(url, proc)
        set_faults(fault_file, {port: f"slow:{SLOW_S}"})
        t0 = time.monotonic()
        calls = Path(f"{fault_file}.calls")
        order = _bulk_then_small(url, calls, easy_vqa_images[0].read_bytes(), easy_vqa_images[1].read_bytes())
        took = time.monotonic() - t0
        assert order == (["small", "bulk"] if first == "small" else ["bulk", "small"])
        assert calls.read_text().split() == [str(port)] * 2  # one model call each
        assert took < 4 * SLOW_S + 5  # two slowed model calls, never a hang
        set_faults(fault_file, {})
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        preemptions = next(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith("vqa_preemptions_total"))
        assert preemptions == (1.0 if first == "small" else 0.0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_batch_interrupted_at_every_layer_and_step_gives_its_own_answers(demo: LoadedModel,
                                                                           easy_vqa_images: list[Path]) -> None:
    """The real model: a bulk batch during which another request is answered at every stage boundary gives the
    answers (token for token) that it gives without interruption, and so does each interrupting request."""
    loaded = demo
    answerer = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype, decoder="fast")
    upload = UploadPixels(loaded.image_res, 10**8)
    pixels = torch.stack([upload.pixels(upload.decode(p.read_bytes())) for p in easy_vqa_images[:8]])
    questions = ["what color is the shape?", "what shape is in the image?", "is there a circle in the image?",
                 "what is the shape's color?"] * 2
    encoded = loaded.tokenizer.encode(questions)
    one = loaded.tokenizer.encode(["what shape is in the image?"])

    def alone(p: torch.Tensor, q: EncodedQuestions) -> list[list[int]]:
        return [a.token_ids for a in answerer.answer_embedded(answerer.encode_images(p), q)]

    expected_bulk = alone(pixels, encoded)
    expected_small = [alone(pixels[i:i + 1], one) for i in range(len(pixels))]
    small_answers: list[list[list[int]]] = []

    def pause() -> None:  # what the executor does at a boundary: answer another request, fully
        i = len(small_answers) % len(pixels)
        small_answers.append(alone(pixels[i:i + 1], one))

    embeds = answerer.encode_images(pixels, pause)
    bulk = [a.token_ids for a in answerer.answer_embedded(embeds, encoded, pause)]
    assert bulk == expected_bulk
    layers = 4 + 2 + 2  # the demo model's vision, text and fusion encoder layers
    assert len(small_answers) > layers  # and at least one decoder step
    assert small_answers == [expected_small[i % len(pixels)] for i in range(len(small_answers))]
