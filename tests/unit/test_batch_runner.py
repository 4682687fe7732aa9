"""The model thread (BatchRunner) without HTTP: every future answered, failures alone, out-of-memory splits, the
cache's bounds, sickness, preemption between steps, shutdown. The collector's tests are in test_batching.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_batching import make_item

from vqa_async.batching.preemption import Preemption
from vqa_async.batching.runner import BatchRunner, ItemFailed
from vqa_async.batching.work import WorkItem
from vqa_async.core.adapter import VqaAdapter, VqaPayload
from vqa_async.core.cache import ImageEmbeddingCache
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered
from vqa_async.model.preprocess import EncodedQuestions


class EchoAnswerer:
    """Answers each question with its first token; fails as told."""

    def __init__(self, fail_token: int | None = None, oom_above: int | None = None) -> None:
        self.fail_token = fail_token
        self.oom_above = oom_above
        self.calls: list[int] = []
        self.encoded: list[int] = []

    def encode_images(self, pixels: torch.Tensor, pause: Callable[[], None] | None = None) -> torch.Tensor:
        self.encoded.append(pixels.shape[0])
        return torch.zeros(pixels.shape[0], 2, 2)

    def answer_embedded(self, embeds: torch.Tensor, q: EncodedQuestions,
                        pause: Callable[[], None] | None = None) -> list[Answered]:
        self.calls.append(q.input_ids.shape[0])
        if self.oom_above is not None and q.input_ids.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (injected)")
        if self.fail_token is not None and (q.input_ids[:, 0] == self.fail_token).any():
            raise ValueError("injected")
        return [Answered(str(int(t)), [int(t)]) for t in q.input_ids[:, 0]]


def executor_with(answerer: EchoAnswerer, max_batch: int = 8, **kw: Any) -> BatchRunner[VqaPayload]:
    """The batching runtime with the VQA adapter over a fake answerer."""
    ex: BatchRunner[VqaPayload] = BatchRunner(Metrics(), max_batch, **kw)
    ex.adapter = VqaAdapter(answerer, ImageEmbeddingCache(16, 2**20), ex.metrics, (torch.zeros(3, 4, 4), None))  # type: ignore[arg-type]
    return ex


async def test_every_future_gets_its_own_answer_and_shared_images_encode_once() -> None:
    loop = asyncio.get_running_loop()
    ans = EchoAnswerer()
    ex = executor_with(ans)
    items = [make_item(loop, 2, key="a", token=1001), make_item(loop, 1, key="b", token=1002),
             make_item(loop, 1, key="a", token=1003)]
    await ex.run(loop, items)
    assert [[a.text for a in it.future.result().result] for it in items] == [["1001", "1001"], ["1002"], ["1003"]]
    assert ans.encoded == [2]  # two distinct images, one vision pass
    await ex.run(loop, [make_item(loop, 1, key="a", token=1004)])
    assert ans.encoded == [2]  # cached
    ex.shutdown()


async def test_a_failing_request_fails_alone() -> None:
    loop = asyncio.get_running_loop()
    ex = executor_with(EchoAnswerer(fail_token=1666))
    items = [make_item(loop, token=1000 + i) for i in range(5)] + [make_item(loop, token=1666)]
    await ex.run(loop, items)
    for it in items[:5]:
        assert it.future.result().result[0].text == str(int(it.payload.input_ids[0, 0]))
    with pytest.raises(ItemFailed) as e:
        items[5].future.result()
    assert e.value.error_id
    ex.shutdown()


async def test_out_of_memory_splits_and_lowers_the_cap() -> None:
    loop = asyncio.get_running_loop()
    ans = EchoAnswerer(oom_above=2)
    ex = executor_with(ans, max_batch=8)
    items = [make_item(loop, token=1000 + i) for i in range(8)]
    await ex.run(loop, items)
    assert all(it.future.result().result[0].text == str(1000 + i) for i, it in enumerate(items))
    assert ex.cap <= 4
    ex.shutdown()


async def test_dead_work_is_skipped_before_the_model() -> None:
    loop = asyncio.get_running_loop()
    ans = EchoAnswerer()
    ex = executor_with(ans)
    gone, late, ok = make_item(loop, token=1001), make_item(loop, token=1002, deadline_in=-1), make_item(loop)
    gone.future.cancel()
    await ex.run(loop, [gone, late, ok])
    assert ans.calls == [1]
    with pytest.raises(TimeoutError):
        late.future.result()
    m = ex.metrics.registry
    assert m.get_sample_value("vqa_dropped_requests_total", {"reason": "client_left"}) == 1
    assert m.get_sample_value("vqa_dropped_requests_total", {"reason": "deadline"}) == 1
    ex.shutdown()


def test_cache_is_bounded_by_entries_and_bytes() -> None:
    c = ImageEmbeddingCache(max_entries=3, max_bytes=4 * 100 * 4)
    for i in range(5):
        c.put(str(i), torch.zeros(100))
    assert len(c) == 3 and c.get("0") is None and c.get("4") is not None
    c.put("big", torch.zeros(1000))  # larger than the byte bound: not kept
    assert c.get("big") is None
    c2 = ImageEmbeddingCache(max_entries=10, max_bytes=2 * 400)
    for i in range(4):
        c2.put(str(i), torch.zeros(100))
    assert len(c2) == 2 and c2.bytes <= 800


def test_cache_shrinks_to_a_share_of_its_bytes() -> None:
    c = ImageEmbeddingCache(max_entries=10, max_bytes=10 * 400)
    for i in range(8):
        c.put(str(i), torch.zeros(100))
    c.shrink(0.5)
    assert len(c) == 4 and c.bytes == 4 * 400 and c.get("0") is None and c.get("7") is not None


async def test_a_request_larger_than_the_lowered_cap_is_answered_in_slices() -> None:
    """After out-of-memory lowered the cap, one request with more questions than the cap used to fail every
    time; it is now answered in slices the device can hold."""
    loop = asyncio.get_running_loop()
    ans = EchoAnswerer(oom_above=2)
    ex = executor_with(ans, max_batch=8)
    big = make_item(loop, 8, token=1007)
    await ex.run(loop, [big])
    assert [a.text for a in big.future.result().result] == ["1007"] * 8
    assert ans.calls == [8, 4, 2, 2, 2, 2]  # halved until the slices fit
    assert ex.failures_in_a_row == 0
    ex.shutdown()


async def test_out_of_memory_on_one_question_fails_that_request_without_looping() -> None:
    loop = asyncio.get_running_loop()
    ans = EchoAnswerer(oom_above=0)
    ex = executor_with(ans, max_batch=8)
    item = make_item(loop, 4)
    await ex.run(loop, [item])
    with pytest.raises(ItemFailed):
        item.future.result()
    assert len(ans.calls) <= 5  # 4 questions, then slices of 2 and 1: no endless retry
    ex.shutdown()


class HoardingAnswerer(EchoAnswerer):
    """Runs out of memory while holding a tensor, as a real model call does; checks on every call that the
    tensors of earlier failed calls are gone."""

    def __init__(self) -> None:
        super().__init__()
        import weakref

        self.held: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_retry: list[int] = []
        self._ref = weakref.ref

    def answer_embedded(self, embeds: torch.Tensor, q: EncodedQuestions,
                        pause: Callable[[], None] | None = None) -> list[Answered]:
        self.alive_at_retry.append(sum(r() is not None for r in self.held))
        activations = torch.zeros(1000, 1000)
        self.held.append(self._ref(activations))
        if q.input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return super().answer_embedded(embeds, q)


async def test_out_of_memory_retries_after_the_failed_call_is_freed() -> None:
    """The split-and-retry used to run inside the `except` block: the traceback kept the failed call's frames,
    and so its tensors, alive while the smaller batches ran."""
    loop = asyncio.get_running_loop()
    ans = HoardingAnswerer()
    ex = executor_with(ans, max_batch=8)
    items = [make_item(loop, token=1000 + i) for i in range(4)]
    await ex.run(loop, items)
    assert all(it.future.result().result[0].text == str(1000 + i) for i, it in enumerate(items))
    assert len(ans.alive_at_retry) > 1 and set(ans.alive_at_retry) == {0}
    ex.shutdown()


async def test_a_retry_skips_requests_whose_deadline_passed_meanwhile() -> None:
    loop = asyncio.get_running_loop()

    class SlowFailing(EchoAnswerer):
        def answer_embedded(self, embeds: torch.Tensor, q: EncodedQuestions,
                            pause: Callable[[], None] | None = None) -> list[Answered]:
            time.sleep(0.3)
            return super().answer_embedded(embeds, q)

    ans = SlowFailing(fail_token=1666)
    ex = executor_with(ans)
    short = make_item(loop, token=1001, deadline_in=0.15)
    bad = make_item(loop, token=1666)
    await ex.run(loop, [short, bad])
    with pytest.raises(TimeoutError):
        short.future.result()
    with pytest.raises(ItemFailed):
        bad.future.result()
    assert ans.calls == [2, 1]  # the failed pair, then `bad` alone; `short` was not run again
    ex.shutdown()


async def test_failures_in_a_row_make_it_sick_and_a_success_heals() -> None:
    loop = asyncio.get_running_loop()
    ans = EchoAnswerer(fail_token=1666)
    ex = executor_with(ans, 8, sick_after_failures=3)
    for _ in range(3):
        await ex.run(loop, [make_item(loop, token=1666)])
    assert ex.sick
    await ex.run(loop, [make_item(loop, token=1001)])
    assert not ex.sick
    ex.shutdown()


async def test_a_batch_where_every_request_fails_is_the_models_fault() -> None:
    """A model that fails everything (a lasting CUDA error) must not answer 500 for requests another process
    could answer: they get ModelFailing (a retryable 503), while a lone bad request still gets ItemFailed."""
    from vqa_async.batching.runner import ModelFailing

    loop = asyncio.get_running_loop()
    ex = executor_with(EchoAnswerer(fail_token=1666))
    items = [make_item(loop, token=1666) for _ in range(4)]
    await ex.run(loop, items)
    await asyncio.sleep(0)
    for it in items:
        with pytest.raises(ModelFailing):
            it.future.result()
    mixed = [make_item(loop, token=1666), make_item(loop, token=1001)]
    await ex.run(loop, mixed)
    await asyncio.sleep(0)
    with pytest.raises(ItemFailed) as e:
        mixed[0].future.result()
    assert not isinstance(e.value, ModelFailing)
    assert mixed[1].future.result().result[0].text == "1001"
    ex.shutdown()


class SteppingAnswerer(EchoAnswerer):
    """Calls `pause` between three steps; the first call waits at its first step until released."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []
        self.first_step = threading.Event()
        self.release = threading.Event()
        self.step_s = 0.0
        self.own_s: dict[str, float] = {}  # each call's wall time, less the pauses it ran

    def answer_embedded(self, embeds: torch.Tensor, q: EncodedQuestions,
                        pause: Callable[[], None] | None = None) -> list[Answered]:
        name = str(int(q.input_ids[0, 0]))
        t0, paused = time.perf_counter(), 0.0
        for step in range(3):
            self.order.append(f"{name}:{step}")
            time.sleep(self.step_s)
            if not self.first_step.is_set():
                self.first_step.set()
                self.release.wait(10)
            if pause is not None:
                p0 = time.perf_counter()
                pause()
                paused += time.perf_counter() - p0
        self.own_s[name] = time.perf_counter() - t0 - paused
        return super().answer_embedded(embeds, q)


async def run_preempted(ex: BatchRunner[VqaPayload], ans: SteppingAnswerer, bulk: list[WorkItem],
                        urgent: list[WorkItem]) -> None:
    """Runs `bulk`, handing `urgent` over while its first step waits."""
    loop = asyncio.get_running_loop()
    run = asyncio.ensure_future(ex.run(loop, bulk))
    await loop.run_in_executor(None, ans.first_step.wait, 10)
    ex.preemption.hand_over(urgent)
    ans.release.set()
    await run


async def test_a_preempting_batch_is_answered_between_the_steps_of_the_running_one() -> None:
    loop = asyncio.get_running_loop()
    ans = SteppingAnswerer()
    ans.step_s = 0.05
    ex = executor_with(ans)
    bulk = [make_item(loop, 4, token=1000, client="bulk")]
    small = [make_item(loop, 1, token=2000, key="other", client="small")]
    settled: list[str] = []
    bulk[0].future.add_done_callback(lambda _: settled.append("bulk"))
    small[0].future.add_done_callback(lambda _: settled.append("small"))
    await run_preempted(ex, ans, bulk, small)
    await asyncio.sleep(0)  # the futures' callbacks
    assert settled == ["small", "bulk"]  # answered inside the bulk batch, not after it
    assert ans.order == ["1000:0", "2000:0", "2000:1", "2000:2", "1000:1", "1000:2"]
    assert [a.text for a in bulk[0].future.result().result] == ["1000"] * 4
    assert small[0].future.result().result[0].text == "2000"
    m = ex.metrics.registry
    assert m.get_sample_value("vqa_preemptions_total") == 1
    # The stage time counts the small batch's, run inside the bulk one's, once: not twice (that would add
    # own_s["2000"], three 50 ms steps). Judged against the calls' own measured time, not a wall-clock bound.
    own = ans.own_s
    decoder_s = m.get_sample_value("vqa_stage_seconds_total", {"stage": "decoder"})
    assert decoder_s == pytest.approx(own["1000"] + own["2000"], abs=own["2000"] / 2)
    assert ex.preemption.take_unstarted() == []
    ex.shutdown()


async def test_requests_handed_over_before_a_boundary_are_answered_in_one_call() -> None:
    """Newcomers that break in together go together: every batch handed over since the last boundary (up to the
    cap) is one model call, counted as one preemption, not one call each."""
    loop = asyncio.get_running_loop()
    ans = SteppingAnswerer()
    ex = executor_with(ans, max_batch=8)
    bulk = [make_item(loop, 4, token=1000, client="bulk")]
    one, two = make_item(loop, 1, token=2000, key="a", client="a"), make_item(loop, 2, token=3000, key="b", client="b")
    run = asyncio.ensure_future(ex.run(loop, bulk))
    await loop.run_in_executor(None, ans.first_step.wait, 10)
    ex.preemption.hand_over([one])
    ex.preemption.hand_over([two])
    ans.release.set()
    await run
    assert ans.calls == [3, 4]  # one call for both newcomers' three questions, then the rest of the bulk batch
    assert [a.text for a in one.future.result().result] == ["2000"]
    assert [a.text for a in two.future.result().result] == ["3000"] * 2
    assert ex.metrics.registry.get_sample_value("vqa_preemptions_total") == 1
    ex.shutdown()


async def test_a_preempting_batch_that_fails_fails_alone_and_late_ones_are_handed_back() -> None:
    loop = asyncio.get_running_loop()
    ans = SteppingAnswerer()
    ans.fail_token = 1666
    ex = executor_with(ans)
    bulk = [make_item(loop, 2, token=1000, client="bulk")]
    poison = [make_item(loop, 1, token=1666, key="p", client="p")]
    await run_preempted(ex, ans, bulk, poison)
    with pytest.raises(ItemFailed):
        poison[0].future.result()
    assert bulk[0].future.result().result[0].text == "1000"
    late = [make_item(loop, 1, client="late")]
    ex.preemption.hand_over(late)  # handed over as the batch ended: nobody ran it, the batcher gets it back
    assert ex.preemption.take_unstarted() == [late]
    ex.shutdown()


async def test_shutdown_answers_what_is_queued_held_or_handed_over() -> None:
    """Requests the collector held between batches, or handed over for preemption and not started, used to be
    left unanswered by `stop` (it emptied only the queue)."""
    from vqa_async.config import Settings
    from vqa_async.core.service import NotReady, VqaService

    loop = asyncio.get_running_loop()
    service = VqaService(Settings(device="cpu"), Metrics())
    queued, held, handed = make_item(loop, client="a"), make_item(loop, client="b"), make_item(loop, client="c")
    service.queue.put_nowait(held)
    service.collector._drain()  # taken from the queue, held in its client's line
    service.queue.put_nowait(queued)
    service.runner.preemption.hand_over([handed])
    await service.stop()
    for item in (queued, held, handed):
        with pytest.raises(NotReady):
            item.future.result()


def test_preemption_budget_is_a_share_of_the_models_time() -> None:
    p = Preemption(0.25, Metrics(), lambda batch: None, lambda: 8)
    assert p.may()  # a full bucket: a quarter of a second
    p.budget.take(0.5)  # a preempting call took half a second
    assert not p.may()
    p.budget._at -= 0.9  # 0.9 s later: 0.25 - 0.5 + 0.225 < 0, still spent
    assert not p.may()
    p.budget._at -= 10.0  # the bucket fills up to its size, not beyond
    assert p.may() and p.budget.take(0.0) == pytest.approx(0.25)
