"""What the batching runtime runs for VQA: a batch of (image, questions) requests through mPLUG.

Everything that knows what a request holds is here: one vision-encoder pass per distinct image of a batch (dedup),
none for an image whose embedding is cached (keyed by the upload's sha256), follow-ups that name their image by
that key alone, all the batch's questions stacked into one decoder call (in slices when out-of-memory lowered the
cap), and the canned probe question.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqa_async.batching.runner import Boundary
from vqa_async.core.cache import ImageEmbeddingCache
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.preprocess import EncodedQuestions


class ImageNotCached(Exception):
    """A follow-up named its image by id, and this process does not hold its embedding (never seen, evicted, or
    restarted since): the client must send the image again."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id} is not cached here")
        self.image_id = image_id


@dataclass(frozen=True)
class VqaPayload:
    """One request's inputs, prepared off the event loop."""

    image_key: str  # sha256 of the uploaded bytes: equal images share a vision-encoder pass and the cache
    # (3, R, R) uint8, resized off the event loop; normalized per batch on the device. None for a follow-up that
    # names its image by `image_key` alone: its embedding must come from the cache (or an upload in its batch).
    pixels: torch.Tensor | None
    input_ids: torch.Tensor  # (Q, 25)
    attention_mask: torch.Tensor  # (Q, 25)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class VqaAdapter:
    """The runner's `BatchAdapter` for mPLUG. Used by the model thread alone (the cache has no lock)."""

    def __init__(self, answerer: Answerer, cache: ImageEmbeddingCache, metrics: Metrics,
                 probe_inputs: tuple[torch.Tensor, EncodedQuestions]) -> None:
        self.answerer = answerer
        self.cache = cache
        self.metrics = metrics
        self._probe_inputs = probe_inputs

    def prepare(self, payloads: list[VqaPayload]) -> list[BaseException | None]:
        """Fails alone, with ImageNotCached (a 409: send the image again), a follow-up by image id whose embedding
        left the cache since admission (evicted, or shrunk after out-of-memory) and that no upload of its batch
        brings. Nothing touches the cache between this check and `run`'s lookup."""
        brought = {p.image_key for p in payloads if p.pixels is not None}
        return [ImageNotCached(p.image_key) if p.pixels is None and p.image_key not in brought
                and not self.cache.holds(p.image_key) else None for p in payloads]

    def run(self, payloads: list[VqaPayload], cap: int, boundary: Boundary) -> list[list[Answered]]:
        # One vision pass per distinct image that the cache does not hold.
        keys = list(dict.fromkeys(p.image_key for p in payloads))
        self.metrics.image_dedups.inc(len(payloads) - len(keys))  # requests that shared another's vision pass
        embeds: dict[str, torch.Tensor] = {}
        misses = []
        for k in keys:
            hit = self.cache.get(k)
            if hit is not None:
                embeds[k] = hit
            else:
                misses.append(k)
        self.metrics.cache_hits.inc(len(keys) - len(misses))
        self.metrics.cache_misses.inc(len(misses))
        if misses:
            # The pixels of each missing image: an upload brings them (a follow-up by id alone has none).
            first = {p.image_key: p.pixels for p in reversed(payloads) if p.pixels is not None}
            with self.metrics.stage("vision", boundary.spent):
                fresh = self.answerer.encode_images(torch.stack([first[k] for k in misses]), boundary)
                if fresh.is_cuda:  # the stage's time is the GPU's, not that of queueing kernels
                    torch.cuda.synchronize(fresh.device)
            for k, e in zip(misses, fresh):
                embeds[k] = e
                # A row of a batch tensor would keep the whole batch alive in the cache: keep a copy of the row.
                self.cache.put(k, e.clone() if len(misses) > 1 else e)
        rows = [embeds[p.image_key] for p in payloads for _ in range(p.size)]
        ids = torch.cat([p.input_ids for p in payloads])
        mask = torch.cat([p.attention_mask for p in payloads])
        with self.metrics.stage("decoder", boundary.spent):
            stacked = torch.stack(rows)
            answers: list[Answered] = []
            for at in range(0, len(rows), cap):  # a request may hold more questions than a lowered cap
                answers += self.answerer.answer_embedded(
                    stacked[at:at + cap], EncodedQuestions(ids[at:at + cap], mask[at:at + cap]), pause=boundary)
        if len(answers) != len(rows):  # every request gets the answers that are its own
            raise RuntimeError(f"the model returned {len(answers)} answers for {len(rows)} questions")
        self.metrics.batch_images.observe(len(keys))
        out, at = [], 0
        for p in payloads:
            out.append(answers[at:at + p.size])
            at += p.size
        return out

    def is_oom(self, error: BaseException) -> bool:
        return is_oom(error)

    def on_oom(self) -> None:
        self.cache.shrink(0.5)  # the cached embeddings share the device's memory with the model's activations
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def probe(self) -> None:
        pixels, questions = self._probe_inputs
        self.answerer.answer_embedded(self.answerer.encode_images(pixels[None]), questions)
