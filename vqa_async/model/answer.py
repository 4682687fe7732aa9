"""Batched answering with the model's own modules.

ModelScope's pipeline answers one pair at a time (`MPlugForAllTasks.forward` decodes only sample 0). Here one
call answers N (image, question) pairs: the vision encoder runs once per *distinct* image, and the rest is the
model's own `forward(train=False)` split in two at the image embeddings, so that those can be shared between
questions and cached between requests. `tests/test_answer.py` pins that this gives exactly what `forward` gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vqa_async.model.architecture import ServingMPlugVQA
from vqa_async.model.decoder import FastDecoder
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

    @property
    def decoder(self) -> str:
        return "fast" if self.fast is not None else "reference"

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) pixels -> (B, tokens, hidden) image embeddings, as `forward` computes them. Pixels are
        normalized float32 (`image_transform`) or uint8 (`image_pixels`), normalized here, on the device."""
        m = self.model
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(pixels.to(self.device, non_blocking=True))
        image = pixels.to(self.device, self.dtype, non_blocking=True)
        embeds = m.visual_encoder.visual(image, skip_last_layer=True)
        if m.large:
            embeds = m.dropout(m.visn_layer_norm(m.visn_fc(embeds)))
        return embeds

    @torch.inference_mode()
    def answer_embedded(self, image_embeds: torch.Tensor, questions: EncodedQuestions) -> list[Answered]:
        """Answers N questions, row i about `image_embeds[i]`: the text half of `forward(train=False)`."""
        m = self.model
        image_embeds = image_embeds.to(self.device, self.dtype)
        input_ids = questions.input_ids.to(self.device)
        attention_mask = questions.attention_mask.to(self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        text_embeds = m.text_encoder(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        image_output, question_output = m.fusion_encoder(
            encoder_embeds=text_embeds, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, return_dict=False)
        states = torch.cat([image_output, question_output], 1)
        atts = torch.cat([image_atts, attention_mask], 1)
        if self.fast is not None:
            topk_ids, _ = self.fast.generate(states, atts)
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
