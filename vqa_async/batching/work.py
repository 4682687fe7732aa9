"""A request on its way to the model, as the batching runtime sees it: a payload it never looks into."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Done(Generic[R]):
    """What a request's future gets: its result, and the timings of the model call that answered it."""

    result: R
    started_at: float  # time.monotonic() when its model call began
    compute_s: float  # that call's time, less the time it spent paused for preempting calls
    batch_size: int  # the size (questions, for VQA) of that call
    trace: object | None = None  # that call's span context, when traced (vqa_async/otel): the request links to it


@dataclass(eq=False)
class WorkItem(Generic[P]):
    """One request: a payload for the adapter, its size in the adapter's units (a batch holds at most
    `max_batch_size` of them), the future its `Done` goes to, and who asked."""

    payload: P
    size: int
    future: asyncio.Future[Done[Any]]
    deadline: float  # time.monotonic() after which nobody waits for the answer
    enqueued_at: float = field(default_factory=time.monotonic)
    # Who asked (an API key's name, or an address): the collector shares each batch among clients.
    client: str = ""
    weight: int = 1  # the client's share: up to `weight` requests per round of a batch
    trace: object | None = None  # the request's span context, when traced (vqa_async/otel): the batch links to it

    def is_dead(self, now: float) -> str | None:
        """Why this item should not reach the model, if it should not."""
        if now > self.deadline:
            return "deadline"
        if self.future.done():  # cancelled: the client left
            return "client_left"
        return None
