"""A faster answer decoder: ModelScope's beam search, with cached keys/values and fused attention.

`MPlugForVisualQuestionAnswering.generation` runs `TextGenerator._fast_translate_batch` (ModelScope's
`mplug/predictor.py`), which at every step reruns the whole text decoder (`BertLMHeadModel`) on the whole prefix of
every beam, and in every decoder layer re-projects the cross-attention keys/values of all image+question tokens,
once per beam. Here, with the decoder's own modules and weights (nothing is copied):

- the cross-attention keys/values are projected once per request, on the un-tiled batch (one row per sample).
  A sample's beams share them without any copy: the beams are folded into the query-length axis, so that one
  attention call per sample serves all of its beams (queries (B, heads, beams, d) against keys (B, heads, S, d));
- the self-attention keys/values of earlier positions are cached and reordered with the beams, so each step
  feeds only the newest token of each beam through the decoder (the reference recomputes the prefix, whose rows
  cannot change: the self-attention is causal);
- attention is `torch.nn.functional.scaled_dot_product_attention` in fp32; in fp16/bf16 it is, by default, the
  reference's own sequence (matmul, `clamp_inf`, / sqrt(head_dim), + mask, softmax, matmul): see below.

The beam search itself is `_fast_translate_batch` line by line (start 101, end 102, the length penalty
((5 + step + 1) / 6) ** 0.6 applied as there, min_length, max_length, only beam 0 alive at the first step,
finished hypotheses collected per sample, a sample done when its beam 0 ends, finished samples removed from the
batch, the final stable sort by score) on the same tensors in the same dtypes: log(softmax(logits)) in the model's
dtype, the same topk over beams*vocab. It returns what the reference returns: per sample a list of `out_size`
token-id tensors, best first, each starting with the start token 101 and ending with the end token 102 (or
whatever token was last at max_length), and per sample a list of 0-d score tensors.

What cannot be bit-identical: the GEMMs run on other row counts than the reference's (one row per beam instead of
the whole prefix), and fused attention sums in another order; logits then differ in the last bits, which flips a
beam only where two candidates are (nearly) tied. In fp32 that has not shown (all answers identical in the tests
and benches). In fp16/bf16 it does: fused attention keeps the scores in fp32 where the reference rounds them to
the model's dtype, and the beam scores are themselves held in fp16/bf16, so ties are common. On random weights
(long arbitrary answers, on CPU) SDPA gave 94/96 identical answers in fp16 and 85/96 in bf16, the reference's
sequence 96/96 in both. Hence `attention="auto"`: SDPA in fp32, the reference's sequence in half precision (still
on cached keys/values projected once: the costly part is gone either way); "sdpa" and "matmul" force one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION = ("auto", "sdpa", "matmul")


@dataclass
class CrossKV:
    """Cross-attention keys/values of one batch of samples (one row per sample, not per beam)."""

    keys: list[torch.Tensor]  # per layer: (B, heads, S, head_dim)
    values: list[torch.Tensor]
    mask: torch.Tensor | None  # (B, 1, 1, S) additive, as the reference's `invert_attention_mask`; None: no padding

    def select(self, samples: torch.Tensor) -> CrossKV:
        mask = self.mask.index_select(0, samples) if self.mask is not None else None
        return CrossKV([k.index_select(0, samples) for k in self.keys],
                       [v.index_select(0, samples) for v in self.values], mask)


class FastDecoder:
    """Decodes with a `BertLMHeadModel`'s own modules. Stateless between calls; not thread-safe (nor is torch)."""

    def __init__(self, text_decoder: Any, beam_size: int = 5, min_length: int = 1, max_length: int = 10,
                 alpha: float = 0.6, start_token: int = 101, end_token: int = 102, attention: str = "auto") -> None:
        if attention not in ATTENTION:
            raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION)}")
        self.decoder = text_decoder  # ModelScope's BertLMHeadModel
        bert: Any = text_decoder.bert
        config = bert.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("the fast decoder supports absolute position embeddings only")
        if not getattr(config, "add_cross_attention", False):
            raise ValueError("the text decoder has no cross-attention")
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the decoder's {config.max_position_embeddings} "
                             f"position embeddings")
        self.embeddings: Any = bert.embeddings
        self.layers: Sequence[Any] = list(bert.encoder.layer)
        self.cls: Any = text_decoder.cls
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.heads
        self.hidden = self.heads * self.head_dim
        self.beam_size = int(beam_size)
        self.min_length = int(min_length)
        self.max_length = int(max_length)
        self.alpha = float(alpha)
        self.start_token = int(start_token)
        self.end_token = int(end_token)
        self.attention = attention

    @classmethod
    def for_model(cls, model: Any, attention: str = "auto") -> FastDecoder:
        """The decoder of an `MPlugForVisualQuestionAnswering`, with its `beam_generator`'s search settings."""
        g: Any = model.beam_generator
        return cls(model.text_decoder, beam_size=g.beam_size, min_length=g.min_length, max_length=g.max_length,
                   alpha=g.alpha, start_token=g.start_token, end_token=g.end_token, attention=attention)

    def uses_sdpa(self, dtype: torch.dtype) -> bool:
        return self.attention == "sdpa" or (self.attention == "auto" and dtype == torch.float32)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                sdpa: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim) + mask) v, over (..., L, head_dim) tensors."""
        if sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # BertSelfAttention.forward's own sequence, in the model's dtype.
        scores = torch.matmul(q, k.transpose(-1, -2))
        if scores.dtype == torch.float16:
            # modeling_mplug.clamp_inf, without its host sync: clamp only if some score is infinite.
            limit = torch.finfo(scores.dtype).max - 1000
            scores = torch.where(torch.isinf(scores).any(), scores.clamp(min=-limit, max=limit), scores)
        scores = scores / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    # -- the decoder, one token per beam -------------------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, hidden) -> (N, heads, L, head_dim), a view."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def project_cross(self, states: torch.Tensor, atts: torch.Tensor) -> CrossKV:
        """Keys/values of the image+question states for every layer's cross-attention: once per request."""
        keys, values = [], []
        for layer in self.layers:
            ca = layer.crossattention.self
            keys.append(self._heads(ca.key(states)))
            values.append(self._heads(ca.value(states)))
        mask = None
        if not bool(atts.bool().all()):
            # BertModel.invert_attention_mask: (1 - mask) * finfo(dtype).min, in the model's dtype.
            ext = atts[:, None, None, :].to(states.dtype)
            mask = (1.0 - ext) * torch.finfo(states.dtype).min
        return CrossKV(keys, values, mask)

    def new_cache(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Self-attention keys/values of all layers: (layers, 2, rows, heads, max_length, head_dim)."""
        return like.new_empty((len(self.layers), 2, rows, self.heads, self.max_length, self.head_dim))

    def step(self, tokens: torch.Tensor, position: int, cache: torch.Tensor, cross: CrossKV) -> torch.Tensor:
        """Logits (N, vocab) for the next token of N = B * beams rows, whose newest token `tokens` (N,) sits at
        `position`; writes that token's self-attention keys/values into `cache[:, :, :, :, position]`."""
        n = tokens.shape[0]
        batch = cross.keys[0].shape[0] if cross.keys else n
        beams = n // batch
        emb = self.embeddings
        sdpa = self.uses_sdpa(cache.dtype)
        ids = tokens.view(n, 1)
        # BertEmbeddings.forward, for one position: word + token type 0, then += position, LayerNorm, dropout.
        x = emb.word_embeddings(ids)
        x = x + emb.token_type_embeddings(torch.zeros_like(ids))
        x += emb.position_embeddings(emb.position_ids[:, position:position + 1])
        x = emb.dropout(emb.LayerNorm(x))
        for i, layer in enumerate(self.layers):
            # Self-attention: the newest token against every cached position (causal: nothing to mask).
            sa = layer.attention.self
            q = self._heads(sa.query(x))
            cache[i, 0, :, :, position] = sa.key(x).view(n, self.heads, self.head_dim)
            cache[i, 1, :, :, position] = sa.value(x).view(n, self.heads, self.head_dim)
            ctx = self._attend(q, cache[i, 0, :, :, :position + 1], cache[i, 1, :, :, :position + 1], None, sdpa)
            a = layer.attention.output(ctx.transpose(1, 2).reshape(n, 1, self.hidden), x)
            # Cross-attention: the beams of a sample are its queries, against its keys/values (projected once).
            ca = layer.crossattention.self
            qc = ca.query(a).view(batch, beams, self.heads, self.head_dim).transpose(1, 2)
            ctx = self._attend(qc, cross.keys[i], cross.values[i], cross.mask, sdpa)
            c = layer.crossattention.output(ctx.transpose(1, 2).reshape(n, 1, self.hidden), a)
            x = layer.output(layer.intermediate(c), c)
        logits: torch.Tensor = self.cls(x)
        return logits[:, -1, :]

    # -- ModelScope's beam search (`TextGenerator._fast_translate_batch`, do_sample=False) --------------------------

    @torch.inference_mode()
    def generate(self, states: torch.Tensor, atts: torch.Tensor, out_size: int = 1,
                 pause: Callable[[], None] | None = None) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """`pause`, if given, is called between steps: the executor answers a newly arrived client's request
        there (it must leave this search's tensors alone), so that it does not wait for the whole search."""
        beam_size = self.beam_size
        max_length = self.max_length
        device = states.device
        batch_size = states.size(0)
        cross = self.project_cross(states, atts)
        cache = self.new_cache(batch_size * beam_size, states)

        batch_offset = torch.arange(batch_size, dtype=torch.long, device=device)
        beam_offset = torch.arange(0, batch_size * beam_size, step=beam_size, dtype=torch.long, device=device)
        alive_seq = torch.full([batch_size * beam_size, 1], self.start_token, dtype=torch.long, device=device)
        # Give full probability to the first beam on the first step (a float32 tensor, as in the reference).
        topk_log_probs = torch.tensor([0.0] + [float("-inf")] * (beam_size - 1), device=device).repeat(batch_size)
        # Finished hypotheses per sample: (score, token ids, the score as a float for the sort).
        hypotheses: list[list[tuple[torch.Tensor, torch.Tensor, float]]] = [[] for _ in range(batch_size)]
        predictions_out: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
        scores_out: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]

        for step in range(max_length):
            logits = self.step(alive_seq[:, -1], step, cache, cross)
            vocab_size = logits.size(-1)
            log_probs = torch.log(torch.softmax(logits.view(-1, vocab_size), dim=-1))
            if step < self.min_length:
                log_probs[:, self.end_token] = -1e20
            length_penalty = ((5.0 + (step + 1)) / 6.0) ** self.alpha
            log_probs += topk_log_probs.view(-1).unsqueeze(1)
            curr_scores = log_probs / length_penalty
            curr_scores = curr_scores.reshape(-1, beam_size * vocab_size)
            topk_scores, topk_ids = curr_scores.topk(beam_size, dim=-1)
            topk_log_probs = topk_scores * length_penalty

            # Resolve beam origin and true word ids.
            topk_beam_index = torch.div(topk_ids, vocab_size, rounding_mode="floor")
            topk_ids = topk_ids.fmod(vocab_size)
            # Map beam_index to batch_index in the flat representation.
            batch_index = topk_beam_index + beam_offset[:topk_beam_index.size(0)].unsqueeze(1)
            select_indices = batch_index.view(-1)
            alive_seq = torch.cat([alive_seq.index_select(0, select_indices), topk_ids.view(-1, 1)], -1)

            is_finished = topk_ids.eq(self.end_token)
            if step + 1 == max_length:
                is_finished.fill_(True)
            if bool(is_finished.any()):
                # One transfer instead of the reference's per-element reads; the same decisions.
                finished = is_finished.cpu()
                end_condition = finished[:, 0].clone()  # the top beam is finished
                score_values = topk_scores.float().cpu()
                offsets = batch_offset.tolist()
                predictions = alive_seq.view(-1, beam_size, alive_seq.size(-1))
                for i in range(finished.size(0)):
                    b = offsets[i]
                    if end_condition[i]:
                        finished[i].fill_(True)
                    for j in finished[i].nonzero().view(-1).tolist():
                        hypotheses[b].append((topk_scores[i, j], predictions[i, j, 0:], float(score_values[i, j])))
                    if end_condition[i]:
                        # Stable, descending, as `sorted(..., key=score, reverse=True)` on the 0-d score tensors
                        # (their float values are exact, so the order is the same).
                        best = sorted(hypotheses[b], key=lambda h: h[2], reverse=True)
                        for score, pred, _ in best[:beam_size]:
                            scores_out[b].append(score)
                            predictions_out[b].append(pred)
                non_finished_cpu = end_condition.logical_not().nonzero().view(-1)
                if len(non_finished_cpu) == 0:
                    break
                if len(non_finished_cpu) < finished.size(0):
                    # Remove finished samples from the batch, as the reference does.
                    non_finished = non_finished_cpu.to(device)
                    topk_log_probs = topk_log_probs.index_select(0, non_finished)
                    batch_index = batch_index.index_select(0, non_finished)
                    batch_offset = batch_offset.index_select(0, non_finished)
                    alive_seq = predictions.index_select(0, non_finished).view(-1, alive_seq.size(-1))
                    cross = cross.select(non_finished)
            # Reorder the cached keys/values with the beams (and drop removed samples).
            cache = cache.index_select(2, batch_index.view(-1))
            if pause is not None and step + 1 < max_length:
                pause()

        pred_ids = [each[:out_size] for each in predictions_out]
        scores = [each[:out_size] for each in scores_out]
        return pred_ids, scores
