"""Preemption, in one place: a light client does not wait for a bulk client's whole batch.

While a batch runs in which some client holds more than its fair share (`collect.over_share`), the batcher hands
the requests of light clients (nothing in that batch, no backlog) over to the model thread (`hand_over_newcomers`).
The model thread answers them at the running batch's next stage boundary (the adapter calls its `Boundary`: after
each encoder layer, between decoder steps), all those handed over since the last boundary in one call, then goes
on with the batch where it stopped. Preempting calls do not preempt, and they may take at most `share` of the
model's time (a token bucket of one second): a call for one request costs the model the time of several in a
batch, so a light client asking as fast as it is answered would otherwise take most of a bulk client's rate; past
the budget its requests ride in the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.work import WorkItem
from vqa_async.metrics import Metrics

WINDOW_S = 1.0  # the budget's bucket holds `share` of this


class Budget:
    """A token bucket of model time: refills at `share` seconds per second, holds at most `share * WINDOW_S`."""

    def __init__(self, share: float) -> None:
        self.share = share
        self._lock = threading.Lock()  # taken on the event loop (may) and the model thread (spend)
        self._left_s = share * WINDOW_S
        self._at = time.monotonic()

    def take(self, spend: float) -> float:
        """Refills for the time since the last call, takes `spend` seconds, returns what is left."""
        with self._lock:
            now = time.monotonic()
            self._left_s = min(self.share * WINDOW_S, self._left_s + self.share * (now - self._at)) - spend
            self._at = now
            return self._left_s


class Preemption:
    """The model thread's side: the batches handed over, answered at the running batch's stage boundaries.

    An instance is the `Boundary` the adapter calls; `run_batch` answers one batch (the runner's own path, with
    its split-and-retry), and `cap` is the runner's current batch cap."""

    def __init__(self, share: float, metrics: Metrics, run_batch: Callable[[list[WorkItem[Any]]], None],
                 cap: Callable[[], int]) -> None:
        self.metrics = metrics
        self.budget = Budget(share)
        self._run_batch = run_batch
        self._cap = cap
        self._urgent: deque[list[WorkItem[Any]]] = deque()  # thread-safe append and popleft
        self._inside = False  # model thread only: a preempting call is running
        self._paused_s = 0.0  # model thread only: time the running batches spent paused
        self._paused_cpu_s = 0.0  # and the model thread's CPU time in those pauses

    # -- the event loop ---------------------------------------------------------------------------------------
    def may(self) -> bool:
        """Whether the budget has time left."""
        return self.budget.share > 0 and self.budget.take(0.0) > 0

    def hand_over(self, batch: list[WorkItem[Any]]) -> None:
        """While a batch runs: answer `batch` at its next stage boundary."""
        self._urgent.append(batch)

    def take_unstarted(self) -> list[list[WorkItem[Any]]]:
        """Once the running batch has returned: what came too late to break in (the batcher runs it next)."""
        out = []
        with contextlib.suppress(IndexError):  # empty (at shutdown the model thread may still take from it)
            while True:
                out.append(self._urgent.popleft())
        return out

    # -- the model thread -------------------------------------------------------------------------------------
    def __call__(self) -> None:
        """A stage boundary of the running batch: answers what was handed over meanwhile."""
        if self._inside or not self._urgent:
            return
        t0, cpu0 = time.monotonic(), time.thread_time()
        self._inside = True
        try:
            while self._urgent:
                # Everything handed over since the last boundary, up to the cap, is one model call: newcomers
                # that break in together are batched together, never one call each.
                batch = list(self._urgent.popleft())
                size = sum(item.size for item in batch)
                while self._urgent and size + sum(item.size for item in self._urgent[0]) <= self._cap():
                    more = self._urgent.popleft()
                    batch += more
                    size += sum(item.size for item in more)
                self.metrics.preemptions.inc()
                self._run_batch(batch)
        finally:
            self._inside = False
            took = time.monotonic() - t0
            self._paused_s += took
            self._paused_cpu_s += time.thread_time() - cpu0
            self.budget.take(took)

    def spent(self) -> tuple[float, float]:
        """Wall and CPU seconds spent in preempting calls so far: not the running batch's own stage time."""
        return self._paused_s, self._paused_cpu_s


async def hand_over_newcomers(preemption: Preemption, collector: BatchCollector, run: asyncio.Future[None],
                              batch: list[WorkItem[Any]], cap: Callable[[], int]) -> None:
    """While `run` runs `batch`: hands the light clients' requests over as they arrive, while `batch` has a
    client over its share and the budget has time. A client whose handed-over request has been answered may
    break in again (a client at concurrency 1 asks again within one bulk batch)."""
    handed: list[WorkItem[Any]] = []
    arrival: asyncio.Future[None] | None = None
    try:
        while True:
            handed = [item for item in handed if not item.future.done()]
            if preemption.may() and (newcomers := collector.newcomers(batch, handed, cap())):
                handed += newcomers
                preemption.hand_over(newcomers)
                preemption.metrics.queue_depth.set(collector.pending())
            arrival = asyncio.ensure_future(collector.arrival())
            await asyncio.wait((run, arrival), return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                return
    finally:
        if arrival is not None:
            arrival.cancel()  # a request it has not taken stays in the queue
            with contextlib.suppress(asyncio.CancelledError):
                await arrival
