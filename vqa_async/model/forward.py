"""mPLUG's `forward` split at the image embeddings, written once for serving and for training the demo model.

`MPlugForVisualQuestionAnswering.forward` runs the vision encoder, projects its output (the large model), then the
text and fusion encoders over each question beside its image; the answer is decoded (serving) or scored
(training) from the fused states. Split here so that an image's embeddings can be computed once and shared by
its questions (and cached between requests). `tests/test_answer.py` pins that serving this way gives exactly
what `forward(train=False)` gives.
"""

from __future__ import annotations

import torch

from vqa_async.model.architecture import ServingMPlugVQA


def project_image(model: ServingMPlugVQA, vision_out: torch.Tensor) -> torch.Tensor:
    """The vision encoder's output (`visual(pixels, skip_last_layer=True)`) -> the image embeddings."""
    if model.large:
        return model.dropout(model.visn_layer_norm(model.visn_fc(vision_out)))
    return vision_out


def fuse(model: ServingMPlugVQA, image_embeds: torch.Tensor, input_ids: torch.Tensor,
         attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i: question i over `image_embeds[i]` -> (states, attention mask) that the answer decoder attends to."""
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    text = model.text_encoder(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    image_out, question_out = model.fusion_encoder(
        encoder_embeds=text, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts, return_dict=False)
    return torch.cat([image_out, question_out], 1), torch.cat([image_atts, attention_mask], 1)
