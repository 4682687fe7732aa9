"""Batch collection: one function with the deadline arithmetic, testable without HTTP or a model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from vqa_async.batching.work import WorkItem


class BatchCollector:
    """Takes work from the queue in batches of at most `max_size` questions.

    An idle server adds no latency: the first item is taken as soon as it arrives, and the collector waits up to
    `max_wait_s` for more only while `incoming()` says requests are on their way (accepted, being preprocessed),
    i.e. only when waiting can pay. Everything already queued is always taken at once.
    """

    def __init__(self, queue: asyncio.Queue[WorkItem], max_size: int, max_wait_s: float,
                 incoming: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.incoming = incoming
        self.clock = clock
        self._carry: WorkItem | None = None  # an item that did not fit in the last batch goes first next time

    def pending(self) -> int:
        return self.queue.qsize() + (self._carry is not None)

    async def collect(self, cap: int | None = None) -> list[WorkItem]:
        limit = min(self.max_size, cap or self.max_size)
        first = self._carry if self._carry is not None else await self.queue.get()
        self._carry = None
        batch, size = [first], first.size
        deadline = self.clock() + self.max_wait_s
        while size < limit:
            if self.queue.empty():
                remaining = deadline - self.clock()
                if remaining <= 0 or self.incoming() == 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            if size + item.size > limit:
                self._carry = item
                break
            batch.append(item)
            size += item.size
        return batch
