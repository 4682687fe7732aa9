"""Fault injection around the real answerer (fakes only inject faults; the model code stays real)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.preprocess import EncodedQuestions


class FaultyAnswerer:
    """Delegates to a real Answerer; can be slowed, made to fail on a marked question, or to run out of memory
    on batches larger than `oom_above`. Records the batch sizes it saw."""

    def __init__(self, real: Answerer, poison_token: int | None = None, oom_above: int | None = None,
                 delay_s: float = 0.0) -> None:
        self.real = real
        self.poison_token = poison_token
        self.oom_above = oom_above
        self.delay_s = delay_s
        self.gate: threading.Event | None = None  # when set up, each call waits for the gate
        self.batches: list[int] = []
        self.questions_seen: list[list[int]] = []

    def encode_images(self, pixels: torch.Tensor, pause: Callable[[], None] | None = None) -> torch.Tensor:
        return self.real.encode_images(pixels, pause)

    def answer_embedded(self, image_embeds: torch.Tensor, questions: EncodedQuestions,
                        pause: Callable[[], None] | None = None) -> list[Answered]:
        n = int(questions.input_ids.shape[0])
        self.batches.append(n)
        self.questions_seen.append([int(x) for x in questions.input_ids[:, 1]])
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.oom_above is not None and n > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        if self.poison_token is not None and (questions.input_ids == self.poison_token).any():
            raise RuntimeError("injected failure")
        return self.real.answer_embedded(image_embeds, questions, pause)
