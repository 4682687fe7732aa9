"""Batched answering with the model's own modules.

ModelScope's pipeline answers one pair at a time (`MPlugForAllTasks.forward` decodes only sample 0). Here one
call answers N (image, question) pairs: the vision encoder runs once per *distinct* image, and the rest is the
model's own `forward(train=False)` split in two at the image embeddings (`forward.py`), so that those can be
shared between questions and cached between requests. `tests/test_answer.py` pins that this gives exactly what
`forward` gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vqa_async.model.architecture import ServingMPlugVQA
from vqa_async.model.decoder import FastDecoder
from vqa_async.model.forward import fuse, project_image
from vqa_async.model.preprocess import EncodedQuestions, QuestionTokenizer, normalize_pixels


@dataclass(frozen=True)
class Answered:
    text: str
    token_ids: list[int]


class Answerer:
    """Runs a loaded model. Not thread-safe by design: one executor thread owns it."""

    def __init__(self, model: ServingMPlugVQA, tokenizer: QuestionTokenizer, device: torch.device,
                 dtype: torch.dtype, decoder: str = "reference", attention: str = "auto") -> None:
        """`decoder`: "reference" (ModelScope's `generation`) or "fast" (`FastDecoder`, with `attention`)."""
        if decoder not in ("reference", "fast"):
            raise ValueError(f"unknown decoder {decoder!r}; choose reference or fast")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.fast = FastDecoder.for_model(model, attention) if decoder == "fast" else None
        # Stage boundaries for `pause`: after every layer of the vision, text and fusion encoders.
        self._pause: Callable[[], None] | None = None
        for layer in encoder_layers(model):
            layer.register_forward_hook(self._after_layer)

    def _after_layer(self, *_: Any) -> None:
        if self._pause is not None:
            self._pause()

    @contextlib.contextmanager
    def _pausing(self, pause: Callable[[], None] | None) -> Iterator[None]:
        """`pause` is called after each encoder layer within; a call run from `pause` sets its own (or none)."""
        outer, self._pause = self._pause, pause
        try:
            yield
        finally:
            self._pause = outer

    @property
    def decoder(self) -> str:
        return "fast" if self.fast is not None else "reference"

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, pause: Callable[[], None] | None = None) -> torch.Tensor:
        """(B, 3, R, R) pixels -> (B, tokens, hidden) image embeddings, as `forward` computes them. Pixels are
        normalized float32 (`image_transform`) or uint8 (`image_pixels`), normalized here, on the device.
        `pause`: as in `answer_embedded`."""
        m = self.model
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels.to(self.device, non_blocking=True))
        image = pixels.to(self.device, self.dtype, non_blocking=True)
        with self._pausing(pause):
            vision_out = m.visual_encoder.visual(image, skip_last_layer=True)
        return project_image(m, vision_out)

    @torch.inference_mode()
    def answer_embedded(self, image_embeds: torch.Tensor, questions: EncodedQuestions,
                        pause: Callable[[], None] | None = None) -> list[Answered]:
        """Answers N questions, row i about `image_embeds[i]`: the text half of `forward(train=False)`.

        `pause`, if given, is called between stages (after each encoder layer, and between the fast decoder's
        steps): the batching runtime answers a newly arrived client's request there. It changes no tensor of this
        call."""
        m = self.model
        image_embeds = image_embeds.to(self.device, self.dtype)
        with self._pausing(pause):
            states, atts = fuse(m, image_embeds, questions.input_ids.to(self.device),
                                questions.attention_mask.to(self.device))
        if self.fast is not None:
            topk_ids, _ = self.fast.generate(states, atts, pause=pause)
        else:
            topk_ids, _ = m.generation(states, atts)
        return [self._answered(ids[0]) for ids in topk_ids]

    def answer(self, pixels: Sequence[torch.Tensor], image_index: Sequence[int],
               questions: EncodedQuestions) -> list[Answered]:
        """`pixels`: the distinct images; question i is about `pixels[image_index[i]]`."""
        embeds = self.encode_images(torch.stack(list(pixels)))
        index = torch.as_tensor(list(image_index), device=embeds.device)
        return self.answer_embedded(embeds.index_select(0, index), questions)

    def _answered(self, ids: torch.Tensor) -> Answered:
        return Answered(self.tokenizer.decode(ids), [int(t) for t in ids.tolist()])


def encoder_layers(model: ServingMPlugVQA) -> list[torch.nn.Module]:
    """The layers of the vision, text and fusion encoders, in the order a forward pass runs them."""
    m: Any = model
    return [*m.visual_encoder.visual.transformer.resblocks, *m.text_encoder.encoder.layer,
            *m.fusion_encoder.encoder.layer]
