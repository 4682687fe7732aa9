"""Batched answering gives exactly what the model's own forward and ModelScope's pipeline give, one pair at a time."""

from __future__ import annotations

from pathlib import Path

import addict
import pytest
import torch
from PIL import Image

from vqa_async.model.answer import Answerer
from vqa_async.model.loader import LoadedModel, load_model
from vqa_async.model.preprocess import decode_image, image_transform

QUESTIONS = ["what color is the shape?", "what is the shape?", "is there a red circle?",
             "does the image contain a triangle?", "is there a blue shape in the image?"]


def _pixels(loaded: LoadedModel, paths: list[Path]) -> list[torch.Tensor]:
    tf = image_transform(loaded.image_res)
    return [tf(decode_image(p.read_bytes(), max_pixels=10**7)) for p in paths]


@pytest.fixture(scope="module")
def random_answerer(random_demo: LoadedModel) -> Answerer:
    return Answerer(random_demo.model, random_demo.tokenizer, random_demo.device, random_demo.dtype)


def test_mixed_batch_equals_each_pair_alone_and_forward(random_demo: LoadedModel, random_answerer: Answerer,
                                                         easy_vqa_images: list[Path]) -> None:
    pixels = _pixels(random_demo, easy_vqa_images[:4])
    # 10 questions over 4 images: several questions share an image, in mixed order.
    index = [0, 1, 2, 3, 0, 0, 2, 1, 3, 3]
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(index))]
    batched = random_answerer.answer(pixels, index, random_demo.tokenizer.encode(qs))
    assert len(batched) == len(qs)
    assert len({a.text for a in batched}) > 1, "random weights should give varied answers"
    for i, (img, q) in enumerate(zip(index, qs)):
        alone = random_answerer.answer([pixels[img]], [0], random_demo.tokenizer.encode([q]))[0]
        assert alone.token_ids == batched[i].token_ids, (i, q)
        enc = random_demo.tokenizer.encode([q])
        with torch.inference_mode():
            topk, _ = random_demo.model(pixels[img][None], addict.Dict(input_ids=enc.input_ids,
                                                                       attention_mask=enc.attention_mask), train=False)
        assert [int(t) for t in topk[0][0]] == batched[i].token_ids


def test_vision_encoder_runs_once_per_distinct_image(random_demo: LoadedModel, random_answerer: Answerer,
                                                      easy_vqa_images: list[Path]) -> None:
    calls: list[int] = []
    visual = random_demo.model.visual_encoder.visual
    handle = visual.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        pixels = _pixels(random_demo, easy_vqa_images[:2])
        random_answerer.answer(pixels, [0, 1, 0, 1, 0], random_demo.tokenizer.encode(QUESTIONS))
    finally:
        handle.remove()
    assert calls == [2]


def test_demo_model_answers_easy_vqa(demo: LoadedModel, demo_answerer: Answerer) -> None:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    n = 48
    distinct = list(dict.fromkeys(image_ids[:n]))
    pixels = _pixels(demo, [Path(paths[i]) for i in distinct])
    got = demo_answerer.answer(pixels, [distinct.index(i) for i in image_ids[:n]], demo.tokenizer.encode(questions[:n]))
    accuracy = sum(g.text == a for g, a in zip(got, answers[:n])) / n
    assert accuracy >= 0.9


def test_equal_to_modelscope_pipeline(tmp_path_factory: pytest.TempPathFactory,
                                      easy_vqa_images: list[Path]) -> None:
    """ModelScope's own, unmodified pipeline on a directory it loads, against our converted copy of it."""
    from vqa_async.model.convert import convert
    from vqa_async.testing.pipeline_support import make_reference_model_dir, reference_answer, reference_pipeline

    src = make_reference_model_dir(tmp_path_factory.mktemp("reference"), seed=0)
    dst = tmp_path_factory.mktemp("served")
    convert(src, dst, progress=False)
    ours = load_model(dst)
    answerer = Answerer(ours.model, ours.tokenizer, ours.device, ours.dtype)
    pipe = reference_pipeline(src)

    images = [Image.open(p).convert("RGB") for p in easy_vqa_images[:3]]
    pairs = [(i, q) for i in range(3) for q in QUESTIONS[:3]]
    pixels = _pixels(ours, easy_vqa_images[:3])
    batched = answerer.answer(pixels, [i for i, _ in pairs], ours.tokenizer.encode([q for _, q in pairs]))
    expected = [reference_answer(pipe, images[i], q) for i, q in pairs]
    assert len(set(expected)) > 1, "the reference model should give varied answers"
    assert [a.text for a in batched] == expected
