"""The batch loop, which ties batching/ together: collect a batch (collect.py), run it on the model thread
(runner.py), and while it runs hand the light clients' newcomers over to run at the model's next layer boundary
(preemption.py). It knows no model: the core starts it with its collector and runner (core/service.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.preemption import hand_over_newcomers
from vqa_async.batching.runner import BatchRunner
from vqa_async.batching.work import WorkItem
from vqa_async.metrics import Metrics

log = logging.getLogger(__name__)

P = TypeVar("P")


async def run_batches(collector: BatchCollector, runner: BatchRunner[Any], metrics: Metrics,
                      preempt: bool) -> None:
    """Until cancelled: one batch at a time, then the batches handed over as it ended. `preempt`: hand
    newcomers over while a batch runs (fair scheduling with a preemption share)."""
    loop = asyncio.get_running_loop()
    while True:
        batch = await collector.collect(runner.cap)
        metrics.queue_depth.set(collector.pending())
        await run_batch(loop, collector, runner, batch, preempt)
        collector.answered(len(batch))
        for late in runner.preemption.take_unstarted():  # handed over as the batch ended: they go first
            await run_batch(loop, collector, runner, late, preempt)
            collector.answered(len(late), more=True)


async def run_batch(loop: asyncio.AbstractEventLoop, collector: BatchCollector, runner: BatchRunner[P],
                    batch: list[WorkItem[P]], preempt: bool) -> None:
    run = asyncio.ensure_future(runner.run(loop, batch))
    try:
        if preempt:
            await hand_over_newcomers(runner.preemption, collector, run, batch, lambda: runner.cap)
        await run
    except Exception as e:  # the runner settles its own failures; this is a bug, keep serving
        log.exception("batch runner failed")
        for item in batch:
            if not item.future.done():
                item.future.set_exception(e)
    finally:
        run.cancel()  # when the batcher itself is cancelled (shutdown); a no-op once the batch has run
