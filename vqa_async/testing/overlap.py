"""Faults that provably hit live requests: fire a fault on a condition (after N answers, or once the fault
injector says a request is inside the model), note the instant, and count the requests in flight then.

    t = await fire_when(lambda: answered() >= 100, lambda: os.kill(pid, signal.SIGKILL))
    assert in_flight(results, t) >= 1

TESTS_LATE_FAULT_S=<s> delays every fault that long after its condition: run a fault test with it set past
the load's end to see the test fail (a fault that lands after the load proves nothing). Not a VQA_* name: the
servers the tests start inherit the environment and refuse VQA_* names they do not know.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class Span(Protocol):
    started: float  # time.monotonic() when sent

    @property
    def done(self) -> float: ...  # time.monotonic() when answered


def in_flight(spans: Iterable[Span], at: float) -> int:
    """How many requests were sent before `at` and answered after it."""
    return sum(1 for s in spans if s.started < at < s.done)


async def wait_for(condition: Callable[[], bool], timeout: float, every: float = 0.01) -> None:
    """Polls `condition` until it holds; TimeoutError after `timeout` s."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


async def fire_when(condition: Callable[[], bool], fault: Callable[[], Any], timeout: float = 120,
                    load: asyncio.Future[Any] | None = None, stop: Callable[[], None] | None = None) -> float:
    """Waits for `condition`, then calls `fault` (awaiting it if it returns an awaitable); returns the
    time.monotonic() just before the fault fired. `load` and `stop`: the load's task and how to end it early, for
    TESTS_FAULT_AFTER_LOAD=1."""
    await wait_for(condition, timeout)
    if os.environ.get("TESTS_FAULT_AFTER_LOAD") == "1" and load is not None:
        if stop is not None:
            stop()
        await asyncio.wait([load])
    at = time.monotonic()
    out = fault()
    if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
        await out
    return at


class Progress:
    """Counts the jobs a closed-loop load generator has taken from `items`. Each of `concurrency` clients takes a
    job only once its previous one was answered, so `answered()` (taken minus clients) is a lower bound. `stop()`
    ends the stream early: the load then ends once what is in flight is answered."""

    def __init__(self, items: Iterable[Any], concurrency: int) -> None:
        self._items = iter(items)
        self.concurrency = concurrency
        self.taken = 0
        self.stopped = False

    def __iter__(self) -> Progress:
        return self

    def __next__(self) -> Any:
        if self.stopped:
            raise StopIteration
        item = next(self._items)
        self.taken += 1
        return item

    def answered(self) -> int:
        return max(0, self.taken - self.concurrency)

    def stop(self) -> None:
        self.stopped = True
