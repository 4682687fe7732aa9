"""Accuracy on the easy-VQA test split, through the same preprocessing and batched answering as the server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from vqa_async.model.answer import Answerer
from vqa_async.model.loader import LoadedModel
from vqa_async.model.preprocess import decode_image, image_transform


def easy_vqa_test(limit: int | None = None) -> tuple[list[str], list[str], list[str]]:
    """(questions, labels, image paths), in the dataset's order (questions about one image are adjacent)."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    n = len(questions) if limit is None else min(limit, len(questions))
    return list(questions[:n]), list(answers[:n]), [paths[i] for i in image_ids[:n]]


def evaluate(loaded: LoadedModel, answerer: Answerer, limit: int | None = None, batch_size: int = 64,
             dump: IO[str] | None = None, progress: bool = True) -> dict[str, Any]:
    questions, labels, paths = easy_vqa_test(limit)
    tf = image_transform(loaded.image_res)
    pixels_by_path: dict[str, torch.Tensor] = {}
    correct = 0
    t0 = time.perf_counter()
    compute = 0.0
    for s in tqdm(range(0, len(questions), batch_size), desc="eval", disable=not progress, unit="batch"):
        qs, ps = questions[s:s + batch_size], paths[s:s + batch_size]
        distinct = list(dict.fromkeys(ps))
        for p in distinct:
            if p not in pixels_by_path:
                pixels_by_path[p] = tf(decode_image(Path(p).read_bytes(), max_pixels=1 << 24))
        index = [distinct.index(p) for p in ps]
        t1 = time.perf_counter()
        answers = answerer.answer([pixels_by_path[p] for p in distinct], index, loaded.tokenizer.encode(qs))
        compute += time.perf_counter() - t1
        for q, a, label in zip(qs, answers, labels[s:s + batch_size]):
            correct += a.text == label
            if dump is not None:
                dump.write(json.dumps({"question": q, "answer": a.text, "label": label}) + "\n")
    n = len(questions)
    return {"model": str(loaded.model_dir), "n": n, "accuracy": round(correct / n, 4) if n else 0.0,
            "seconds": round(time.perf_counter() - t0, 2), "answers_per_s": round(n / compute, 1) if compute else 0.0,
            "batch_size": batch_size}
