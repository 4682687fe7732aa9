"""The batching runtime with a fake adapter: it never sees a model's inputs, so a ten-line adapter drives it.

What is generic lives here: results with their timings, split-and-retry, the out-of-memory cap, deadlines and
departed clients, the adapter's refusals, sickness and the probe, preemption at the adapter's boundaries. The VQA
adapter's own behaviour (dedup, the embedding cache, question slices) is pinned in tests/test_batching.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from vqa_async.batching.runner import BatchRunner, Boundary, ItemFailed, ModelFailing
from vqa_async.batching.work import WorkItem
from vqa_async.metrics import Metrics


class Doubler:
    """Payloads are ints; answers each with twice its value. 13 fails; a call over `room` units is out of memory."""

    def __init__(self, room: int = 1000) -> None:
        self.room, self.calls, self.probed = room, [], 0  # type: ignore[var-annotated]

    def prepare(self, payloads: list[int]) -> list[BaseException | None]:
        return [KeyError("refused") if p < 0 else None for p in payloads]

    def run(self, payloads: list[int], cap: int, boundary: Boundary) -> list[int]:
        self.calls.append(list(payloads))
        boundary()
        if 13 in payloads:
            raise ValueError("unlucky")
        if sum(payloads) > self.room:
            raise MemoryError("out of memory (fake)")
        return [2 * p for p in payloads]

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)

    def on_oom(self) -> None:
        pass

    def probe(self) -> None:
        self.probed += 1


def runner(adapter: Doubler, max_batch: int = 64, **kw: float) -> BatchRunner[int]:
    r: BatchRunner[int] = BatchRunner(Metrics(), max_batch, **kw)  # type: ignore[arg-type]
    r.adapter = adapter
    return r


def item(loop: asyncio.AbstractEventLoop, p: int, deadline_in: float = 60.0, client: str = "") -> WorkItem[int]:
    return WorkItem(p, max(1, abs(p)), loop.create_future(), time.monotonic() + deadline_in, client=client)


async def test_every_request_gets_its_own_result_with_the_calls_timings() -> None:
    loop = asyncio.get_running_loop()
    r = runner(Doubler())
    items = [item(loop, p) for p in (1, 2, 3)]
    await r.run(loop, items)
    await asyncio.sleep(0)
    done = [it.future.result() for it in items]
    assert [d.result for d in done] == [2, 4, 6]
    assert {d.batch_size for d in done} == {6} and {d.started_at for d in done} == {done[0].started_at}
    assert all(d.compute_s >= 0 for d in done)
    r.shutdown()


async def test_a_failing_request_fails_alone_and_a_batch_that_all_fails_is_the_models_fault() -> None:
    loop = asyncio.get_running_loop()
    a = Doubler()
    r = runner(a)
    items = [item(loop, p) for p in (1, 13, 2, 3)]
    await r.run(loop, items)
    await asyncio.sleep(0)
    assert [it.future.result().result for it in items if it.payload != 13] == [2, 4, 6]
    with pytest.raises(ItemFailed) as e:
        items[1].future.result()
    assert not isinstance(e.value, ModelFailing) and r.failures_in_a_row == 0  # a success came after it
    both = [item(loop, 13), item(loop, 13)]
    await r.run(loop, both)
    await asyncio.sleep(0)
    for it in both:
        with pytest.raises(ModelFailing):
            it.future.result()
    r.shutdown()


async def test_out_of_memory_halves_the_cap_and_retries_split() -> None:
    loop = asyncio.get_running_loop()
    a = Doubler(room=10)
    r = runner(a, max_batch=64)
    items = [item(loop, p) for p in (4, 4, 4, 4, 4)]
    await r.run(loop, items)
    await asyncio.sleep(0)
    assert [it.future.result().result for it in items] == [8] * 5
    assert r.cap < 64 and r.metrics.registry.get_sample_value("vqa_batch_failures_total", {"kind": "oom"}) >= 1
    r.shutdown()


async def test_the_dead_and_the_refused_never_reach_the_model() -> None:
    loop = asyncio.get_running_loop()
    a = Doubler()
    r = runner(a)
    late, gone, refused, ok = item(loop, 1, deadline_in=-1), item(loop, 2), item(loop, -3), item(loop, 4)
    gone.future.cancel()
    await r.run(loop, [late, gone, refused, ok])
    await asyncio.sleep(0)
    assert a.calls == [[4]]
    with pytest.raises(TimeoutError):
        late.future.result()
    with pytest.raises(KeyError):
        refused.future.result()
    assert ok.future.result().result == 8
    r.shutdown()


async def test_sick_after_failures_in_a_row_and_a_probe_heals() -> None:
    loop = asyncio.get_running_loop()
    a = Doubler()
    r = runner(a, sick_after_failures=2)
    for _ in range(2):
        await r.run(loop, [item(loop, 13)])
    assert r.sick
    await r.call(r.probe)
    assert not r.sick and a.probed == 1
    r.shutdown()


async def test_requests_handed_over_run_at_the_adapters_boundary_in_one_call() -> None:
    loop = asyncio.get_running_loop()
    a = Doubler()
    r = runner(a)
    bulk = [item(loop, 5, client="bulk")]
    urgent = [item(loop, 7, client="a"), item(loop, 8, client="b")]
    r.preemption.hand_over(urgent[:1])
    r.preemption.hand_over(urgent[1:])
    await r.run(loop, bulk)
    await asyncio.sleep(0)
    assert a.calls == [[5], [7, 8]]  # the bulk call reached its boundary, the newcomers ran there together
    assert [it.future.result().result for it in urgent + bulk] == [14, 16, 10]
    assert r.metrics.registry.get_sample_value("vqa_preemptions_total") == 1
    r.shutdown()


def test_the_batching_runtime_imports_neither_torch_nor_the_model() -> None:
    code = ("import sys, vqa_async.batching.runner, vqa_async.batching.collect, vqa_async.batching.preemption; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('vqa_async.model', 'vqa_async.core'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
