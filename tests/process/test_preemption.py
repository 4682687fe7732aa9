"""Preemption: a light client's request is answered inside a running bulk batch, between its layers.

Through a real `serve` (the model slowed by the test-only fault injector, so that the order is certain), and on
the real model (a batch interrupted at every layer and step gives exactly the answers it gives alone).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import torch
from cluster_support import set_faults

from vqa_async.model.answer import Answerer
from vqa_async.model.loader import LoadedModel
from vqa_async.model.preprocess import EncodedQuestions, UploadPixels
from vqa_async.testing.launch import Faults, Launched, start_serve

SLOW_S = 1.0  # each model call sleeps this long first (tests/faults/sitecustomize.py)


def _form(image: bytes, questions: list[str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", image, filename="a.png", content_type="image/png")
    for q in questions:
        form.add_field("question", q)
    return form


def _calls(calls: Path) -> int:
    return len(calls.read_text().split()) if calls.exists() else 0


async def _until_calls(calls: Path, n: int) -> None:
    """Until the n-th (slowed) model call is in progress."""
    deadline = time.monotonic() + 30
    while _calls(calls) < n:
        assert time.monotonic() < deadline, f"model call {n} never started"
        await asyncio.sleep(0.02)


async def _ask(url: str, form: aiohttp.FormData, source: str, order: list[str], name: str) -> None:
    """One request from its own source address (127.0.0.x: the server sees that address as the client)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as s, s.post(url + "/v1/vqa", data=form) as r:
        assert r.status == 200, await r.text()
        await r.read()
    order.append(name)


def _bulk_then_light(url: str, calls: Path, bulk_image: bytes, light_images: list[bytes]) -> list[str]:
    """A bulk client's request; while it is in the model, three more (a backlog: they ride the next batch
    together, where the bulk client holds three rounds); while that batch is in the model, three light clients
    from three other addresses ask one question each. Returns who was answered in which order."""

    async def scenario() -> list[str]:
        order: list[str] = []

        def bulk(i: int) -> asyncio.Task[None]:
            form = _form(bulk_image, ["what color is the shape?", "what shape is in the image?"])
            return asyncio.create_task(_ask(url, form, "127.0.0.1", order, f"bulk{i}"))

        first = bulk(1)
        await _until_calls(calls, 1)
        backlog = [bulk(i) for i in (2, 3, 4)]
        await _until_calls(calls, 2)  # the bulk client's backlog is in the model
        light = [asyncio.create_task(_ask(url, _form(image, ["what shape is in the image?"]), f"127.0.0.{10 + i}",
                                          order, "light")) for i, image in enumerate(light_images)]
        await asyncio.gather(first, *backlog, *light)
        return order

    return asyncio.run(scenario())


def _serve(demo_dir: Path, fault_file: Path, *args: str) -> tuple[Launched, str, int]:
    srv = start_serve(demo_dir, *args, faults=Faults(fault_file))
    return srv, srv.url, srv.port


def _preemptions(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    return next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("vqa_preemptions_total"))


@pytest.mark.parametrize("share", ["0.5", "0"])
def test_light_clients_are_answered_inside_a_bulk_clients_batch_together(
        share: str, demo_dir: Path, easy_vqa_images: list[Path], tmp_path: Path) -> None:
    """With the default --preempt-share the three light clients are answered at the bulk batch's first layer
    boundary after they arrive, in one model call between its layers, before the bulk requests of that batch;
    with 0 (the behaviour before preemption) they wait for the batch."""
    fault_file = tmp_path / "faults.json"
    proc, url, port = _serve(demo_dir, fault_file, "--preempt-share", share)
    try:
        set_faults(fault_file, {port: f"slow:{SLOW_S}"})
        t0 = time.monotonic()
        calls = Path(f"{fault_file}.calls")
        order = _bulk_then_light(url, calls, easy_vqa_images[0].read_bytes(),
                                 [p.read_bytes() for p in easy_vqa_images[1:4]])
        took = time.monotonic() - t0
        set_faults(fault_file, {})
        assert order[0] == "bulk1"
        if share == "0.5":
            assert order[1:4] == ["light"] * 3 and sorted(order[4:]) == ["bulk2", "bulk3", "bulk4"]
        else:
            assert sorted(order[1:4]) == ["bulk2", "bulk3", "bulk4"] and order[4:] == ["light"] * 3
        # One model call for the first bulk request, one for its backlog, one for the three light ones.
        assert _calls(calls) == 3
        assert took < 6 * SLOW_S + 10  # three slowed model calls, never a hang
        assert _preemptions(url) == (1.0 if share == "0.5" else 0.0)
    finally:
        proc.stop()


def test_many_people_ride_the_next_batch_together_instead_of_breaking_in(
        demo_dir: Path, easy_vqa_images: list[Path], tmp_path: Path) -> None:
    """Many people from many addresses, one question each: while one person's question is in the model, the
    others arrive. Every one of them is "light", but nobody holds more than a round of the running batch, so
    they are answered together in the next batch (two model calls for seven people, as FIFO would), never one
    preempting call each (the old default: up to one model call per person, each costing several batched
    questions' time)."""
    fault_file = tmp_path / "faults.json"
    proc, url, port = _serve(demo_dir, fault_file)  # the default settings
    try:
        set_faults(fault_file, {port: f"slow:{SLOW_S}"})
        calls = Path(f"{fault_file}.calls")
        images = [p.read_bytes() for p in easy_vqa_images[:7]]

        async def scenario() -> list[str]:
            order: list[str] = []
            first = asyncio.create_task(_ask(url, _form(images[0], ["what shape is in the image?"]), "127.0.0.20",
                                             order, "person0"))
            await _until_calls(calls, 1)
            others = [asyncio.create_task(_ask(url, _form(image, ["what color is the shape?"]), f"127.0.0.{20 + i}",
                                               order, f"person{i}")) for i, image in enumerate(images[1:], 1)]
            await asyncio.gather(first, *others)
            return order

        order = asyncio.run(scenario())
        set_faults(fault_file, {})
        assert order[0] == "person0" and sorted(order[1:]) == [f"person{i}" for i in range(1, 7)]
        assert _calls(calls) == 2
        assert _preemptions(url) == 0.0
    finally:
        proc.stop()


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
