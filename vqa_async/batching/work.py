"""A request on its way to the model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from vqa_async.model.answer import Answered


class ImageNotCached(Exception):
    """A follow-up named its image by id, and this process does not hold its embedding (never seen, evicted, or
    restarted since): the client must send the image again."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"image {image_id} is not cached here")
        self.image_id = image_id


@dataclass(eq=False)
class WorkItem:
    """One request: one image and its questions. `future` gets one Answered per question."""

    image_key: str  # sha256 of the uploaded bytes: equal images share a vision-encoder pass and the cache
    # (3, R, R) uint8, resized off the event loop; normalized per batch on the device. None for a follow-up that
    # names its image by `image_key` alone: its embedding must come from the cache (or an upload in its batch).
    pixels: torch.Tensor | None
    input_ids: torch.Tensor  # (Q, 25)
    attention_mask: torch.Tensor  # (Q, 25)
    future: asyncio.Future[list[Answered]]
    deadline: float  # time.monotonic() after which nobody waits for the answer
    enqueued_at: float = field(default_factory=time.monotonic)
    # Who asked (an API key's name, or an address): the collector shares each batch among clients.
    client: str = ""
    weight: int = 1  # the client's share: up to `weight` requests per round of a batch
    # Filled in by the executor thread, for the response's timings.
    started_at: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def is_dead(self, now: float) -> str | None:
        """Why this item should not reach the model, if it should not."""
        if now > self.deadline:
            return "deadline"
        if self.future.done():  # cancelled: the client left
            return "client_left"
        return None
