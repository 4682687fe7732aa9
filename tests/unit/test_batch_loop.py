"""The batch loop (vqa_async/batching/loop.py) without HTTP or a model: a queue, the real collector and runner,
and a ten-line adapter. The VQA service runs the same loop (core/service.py); preemption inside it is pinned in
test_preemption.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.loop import run_batches
from vqa_async.batching.runner import BatchRunner, Boundary
from vqa_async.batching.work import WorkItem
from vqa_async.metrics import Metrics


class Doubler:
    """Payloads are ints, answered with twice their value; records each call's payloads."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def prepare(self, payloads: list[int]) -> list[BaseException | None]:
        return [None for _ in payloads]

    def run(self, payloads: list[int], cap: int, boundary: Boundary) -> list[int]:
        self.calls.append(list(payloads))
        return [2 * p for p in payloads]

    def is_oom(self, error: BaseException) -> bool:
        return False

    def on_oom(self) -> None:
        pass

    def probe(self) -> None:
        pass


async def started(max_batch: int) -> tuple[asyncio.Queue[WorkItem[Any]], BatchRunner[int], Doubler, Metrics,
                                           asyncio.Task[None]]:
    queue: asyncio.Queue[WorkItem[Any]] = asyncio.Queue()
    metrics = Metrics()
    runner: BatchRunner[int] = BatchRunner(metrics, max_batch)
    adapter = Doubler()
    await runner.start(lambda: adapter)  # type: ignore[arg-type,return-value]
    collector = BatchCollector(queue, max_batch, 0.0)
    task = asyncio.create_task(run_batches(collector, runner, metrics, preempt=False))
    return queue, runner, adapter, metrics, task


async def stopped(runner: BatchRunner[int], task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    runner.shutdown()


def item(loop: asyncio.AbstractEventLoop, p: int) -> WorkItem[int]:
    return WorkItem(p, 1, loop.create_future(), time.monotonic() + 60)


async def test_every_queued_item_is_answered_in_batches_of_at_most_max() -> None:
    loop = asyncio.get_running_loop()
    queue, runner, adapter, metrics, task = await started(max_batch=3)
    try:
        items = [item(loop, p) for p in range(7)]
        for it in items:
            queue.put_nowait(it)
        done = await asyncio.wait_for(asyncio.gather(*(it.future for it in items)), 30)
        assert [d.result for d in done] == [2 * p for p in range(7)]
        assert sorted(p for call in adapter.calls for p in call) == list(range(7))
        assert max(len(call) for call in adapter.calls) <= 3 and len(adapter.calls) >= 3
        assert metrics.queue_depth._value.get() == 0  # set as each batch is taken
    finally:
        await stopped(runner, task)


async def test_a_bug_in_the_runner_fails_its_batch_and_the_loop_keeps_serving() -> None:
    loop = asyncio.get_running_loop()
    queue, runner, adapter, _, task = await started(max_batch=4)
    real_run = runner.run
    calls = 0

    async def first_call_breaks(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        await real_run(*args)

    runner.run = first_call_breaks  # type: ignore[method-assign]
    try:
        broken = item(loop, 1)
        queue.put_nowait(broken)
        (outcome,) = await asyncio.wait_for(asyncio.gather(broken.future, return_exceptions=True), 30)
        assert isinstance(outcome, RuntimeError) and str(outcome) == "a bug"
        later = item(loop, 5)
        queue.put_nowait(later)
        assert (await asyncio.wait_for(later.future, 30)).result == 10
        assert not task.done()
    finally:
        await stopped(runner, task)
