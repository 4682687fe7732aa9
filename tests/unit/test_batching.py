"""The batch collector and the model thread, without HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.preemption import Preemption
from vqa_async.batching.runner import BatchRunner, ItemFailed
from vqa_async.batching.work import WorkItem
from vqa_async.core.adapter import VqaAdapter, VqaPayload
from vqa_async.core.cache import ImageEmbeddingCache
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered
from vqa_async.model.preprocess import EncodedQuestions


def make_item(loop: asyncio.AbstractEventLoop, size: int = 1, key: str = "img", token: int = 1000,
              deadline_in: float = 60.0, client: str = "", weight: int = 1) -> WorkItem:
    ids = torch.full((size, 25), token)
    payload = VqaPayload(key, torch.zeros(3, 4, 4), ids, torch.ones(size, 25, dtype=torch.long))
    return WorkItem(payload, size, loop.create_future(), time.monotonic() + deadline_in, client=client, weight=weight)


@pytest.mark.parametrize("max_size", [1, 3, 8])
async def test_takes_everything_queued_up_to_max(max_size: int) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    items = [make_item(loop) for _ in range(10)]
    for it in items:
        q.put_nowait(it)
    c = BatchCollector(q, max_size, max_wait_s=0.0)
    batches = []
    while c.pending():
        batches.append(await c.collect())
    assert [len(b) for b in batches[:-1]] == [max_size] * (len(batches) - 1)
    assert [it for b in batches for it in b] == items  # FIFO, nothing lost


@pytest.mark.parametrize("max_wait_s", [0.05, 10.0])
async def test_idle_server_does_not_wait(max_wait_s: float) -> None:
    """With nothing on its way, one request is handed over at once, whatever max_wait is."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    q.put_nowait(make_item(loop))
    c = BatchCollector(q, 8, max_wait_s=max_wait_s, incoming=lambda: 0)
    batch = await asyncio.wait_for(c.collect(), timeout=1.0)
    assert len(batch) == 1


@pytest.mark.parametrize("max_size, max_wait_s", [(4, 0.5), (8, 1.0)])
async def test_waits_for_requests_on_their_way(max_size: int, max_wait_s: float) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    q.put_nowait(make_item(loop))
    on_the_way = [1]
    c = BatchCollector(q, max_size, max_wait_s=max_wait_s, incoming=lambda: on_the_way[0])

    async def arrive() -> None:
        await asyncio.sleep(0.02)
        q.put_nowait(make_item(loop))
        on_the_way[0] = 0

    task = asyncio.create_task(arrive())
    batch = await c.collect()
    await task
    assert len(batch) == 2


async def test_gives_up_waiting_at_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    q.put_nowait(make_item(loop))
    fake_now = [0.0]

    def clock() -> float:
        fake_now[0] += 0.01  # every look at the clock advances it 10 ms
        return fake_now[0]

    c = BatchCollector(q, 8, max_wait_s=0.05, incoming=lambda: 1, clock=clock)
    batch = await asyncio.wait_for(c.collect(), timeout=2.0)
    assert len(batch) == 1


async def test_item_that_does_not_fit_goes_first_next_time() -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    a, b, c_ = make_item(loop, 3), make_item(loop, 3), make_item(loop, 1)
    for it in (a, b, c_):
        q.put_nowait(it)
    c = BatchCollector(q, 4, max_wait_s=0.0)
    assert await c.collect() == [a]
    assert await c.collect() == [b, c_]


async def test_cap_lowers_the_batch() -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    for _ in range(6):
        q.put_nowait(make_item(loop))
    c = BatchCollector(q, 6, max_wait_s=0.0)
    assert len(await c.collect(cap=2)) == 2


async def drain(c: BatchCollector) -> list[list[WorkItem]]:
    batches = []
    while c.pending():
        batches.append(await c.collect())
    return batches


@pytest.mark.parametrize("max_size, big_size, big_queued", [(16, 4, 64), (16, 1, 64), (8, 2, 20), (64, 4, 64)])
async def test_fair_a_lone_request_is_not_pushed_behind_a_bulk_client(max_size: int, big_size: int,
                                                                       big_queued: int) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    for _ in range(big_queued):
        q.put_nowait(make_item(loop, big_size, client="bulk"))
    small = make_item(loop, 1, client="small")
    q.put_nowait(small)  # last in the queue
    fair = await drain(BatchCollector(q, max_size, max_wait_s=0.0, fair=True))
    assert small in fair[0]
    assert sum(len(b) for b in fair) == big_queued + 1

    for _ in range(big_queued):
        q.put_nowait(make_item(loop, big_size, client="bulk"))
    q.put_nowait(small)
    fifo = await drain(BatchCollector(q, max_size, max_wait_s=0.0, fair=False))
    assert small in fifo[-1]  # today's behaviour, kept behind the switch


@pytest.mark.parametrize("max_size, sizes", [(16, [4] * 20), (8, [3, 3, 1, 2, 4, 1, 1, 5]), (4, [1] * 9)])
@pytest.mark.parametrize("fair", [True, False])
async def test_a_single_client_gets_the_same_batches_as_fifo(max_size: int, sizes: list[int], fair: bool) -> None:
    """Fair sharing costs a lone client nothing: its batches are as full, and in order."""
    loop = asyncio.get_running_loop()

    async def batches(fair: bool) -> list[list[int]]:
        q: asyncio.Queue[WorkItem] = asyncio.Queue()
        items = [make_item(loop, n, client="only", token=i) for i, n in enumerate(sizes)]
        for it in items:
            q.put_nowait(it)
        return [[items.index(it) for it in b] for b in await drain(BatchCollector(q, max_size, 0.0, fair=fair))]

    assert await batches(fair) == await batches(False)


@pytest.mark.parametrize("clients", [2, 3, 5])
async def test_fair_round_robin_shares_every_batch_and_keeps_each_clients_order(clients: int) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    items = {f"c{k}": [make_item(loop, 1, client=f"c{k}") for _ in range(10)] for k in range(clients)}
    for k in range(clients):  # each client's requests arrive together, one client after the other
        for it in items[f"c{k}"]:
            q.put_nowait(it)
    batches = await drain(BatchCollector(q, clients * 2, 0.0, fair=True))
    for b in batches:
        assert sorted(it.client for it in b) == sorted([f"c{k}" for k in range(clients)] * 2)
    for name, mine in items.items():
        assert [it for b in batches for it in b if it.client == name] == mine


@pytest.mark.parametrize("max_size", [5, 8])
async def test_fair_rotation_reaches_every_client_when_a_batch_holds_fewer_than_the_clients(max_size: int) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    n_clients = max_size + 3
    for k in range(n_clients):
        for _ in range(4):
            q.put_nowait(make_item(loop, 1, client=f"c{k}"))
    c = BatchCollector(q, max_size, 0.0, fair=True)
    first, second = await c.collect(), await c.collect()
    assert len({it.client for it in first + second}) == n_clients  # nobody waits two batches


@pytest.mark.parametrize("weight", [2, 3])
async def test_fair_weights_give_a_client_that_many_requests_per_round(weight: int) -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    for _ in range(30):
        q.put_nowait(make_item(loop, 1, client="heavy", weight=weight))
        q.put_nowait(make_item(loop, 1, client="light"))
    batch = await BatchCollector(q, 4 * (weight + 1), 0.0, fair=True).collect()
    assert [it.client for it in batch].count("heavy") == 4 * weight
    assert [it.client for it in batch].count("light") == 4


async def test_fair_an_oversized_request_still_goes_alone() -> None:
    """A request larger than a lowered cap is still handed over (the executor answers it in slices)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    big, other = make_item(loop, 6, client="a"), make_item(loop, 1, client="b")
    q.put_nowait(big)
    q.put_nowait(other)
    c = BatchCollector(q, 8, 0.0, fair=True)
    assert await c.collect(cap=4) == [big]
    assert await c.collect(cap=4) == [other]


async def test_fair_waits_for_requests_on_their_way_from_another_client() -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    q.put_nowait(make_item(loop, client="a"))
    on_the_way = [1]
    c = BatchCollector(q, 4, max_wait_s=1.0, incoming=lambda: on_the_way[0], fair=True)

    async def arrive() -> None:
        await asyncio.sleep(0.02)
        q.put_nowait(make_item(loop, client="b"))
        on_the_way[0] = 0

    task = asyncio.create_task(arrive())
    batch = await c.collect()
    await task
    assert [it.client for it in batch] == ["a", "b"]


async def test_fair_a_request_arriving_during_a_batch_rides_the_next_one() -> None:
    """The fairness bench's pattern: a bulk client keeps 64 requests of 4 questions queued; a small one sends one
    question while a batch runs. It waits for that batch (no preemption) and rides the next, never later; the
    bulk client's batches stay full, and the small one's holds as many bulk requests as fit beside it."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    for _ in range(64):
        q.put_nowait(make_item(loop, 4, client="bulk"))
    c = BatchCollector(q, 16, 0.0, fair=True)
    for _ in range(5):
        running = await c.collect()  # the batch in progress when the small request arrives
        assert [it.size for it in running] == [4, 4, 4, 4]
        small = make_item(loop, 1, client="small")
        q.put_nowait(small)
        for _ in running:  # the bulk client sends again as soon as it is answered
            q.put_nowait(make_item(loop, 4, client="bulk"))
        shared = await c.collect()
        assert small in shared
        assert sorted(it.size for it in shared) == [1, 4, 4, 4]  # a fourth bulk request would make 17
        for _ in range(len(shared) - 1):
            q.put_nowait(make_item(loop, 4, client="bulk"))


async def test_newcomers_are_the_light_clients_with_nothing_in_the_running_batch() -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    c = BatchCollector(q, max_size=8, max_wait_s=0.0)
    for _ in range(6):
        q.put_nowait(make_item(loop, 4, client="bulk"))
    running = await c.collect()
    assert c.newcomers(running, [], 8) == []  # only the bulk client waits: nothing breaks in
    assert c.newcomers([], [], 8) == []  # nor does it when not in the batch: its backlog is more than a round
    small, other, heavy = (make_item(loop, 1, client="small"), make_item(loop, 2, client="other", weight=2),
                           make_item(loop, 2, client="other", weight=2))
    for it in (small, other, heavy, *(make_item(loop, 1, client="second bulk") for _ in range(2))):
        q.put_nowait(it)
    taken = c.newcomers(running, [], 8)
    assert taken == [small, other, heavy]  # "other" has two queued, within its weight of 2
    assert c.pending() == 4 + 2  # the bulk clients wait for the next batch
    assert c.newcomers(running, taken, 8) == []


@pytest.mark.parametrize("people", [2, 8, 32])
async def test_many_people_never_break_into_a_batch_where_nobody_holds_more_than_a_round(people: int) -> None:
    """Many people asking one question each: every one of them is "light", but none holds more than its share of
    the running batch, so they ride the next batch together instead of one model call each."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    c = BatchCollector(q, max_size=16, max_wait_s=0.0)
    for i in range(people):
        q.put_nowait(make_item(loop, 1, client=f"person {i}"))
    running = await c.collect()
    for i in range(people, people + 8):
        q.put_nowait(make_item(loop, 1, client=f"person {i}"))
    assert c.newcomers(running, [], 16) == []
    assert c.pending() == max(0, people - 16) + 8


async def test_a_request_of_many_questions_is_not_more_than_a_share() -> None:
    """One client's one request (several questions about one image: a person on the page) is one round, however
    many questions it holds; a client with two rounds of requests in the batch is bulk."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    c = BatchCollector(q, max_size=16, max_wait_s=0.0)
    small = make_item(loop, 1, client="small")
    q.put_nowait(small)
    assert c.newcomers([make_item(loop, 8, client="page")], [], 16) == []
    assert c.newcomers([make_item(loop, 2, client="w", weight=2)] * 2, [], 16) == []  # within its weight
    assert c.newcomers([make_item(loop, 4, client="bulk")] * 2, [], 16) == [small]


async def test_newcomers_stay_within_the_cap_but_a_first_request_always_goes() -> None:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[WorkItem] = asyncio.Queue()
    c = BatchCollector(q, max_size=4, max_wait_s=0.0)
    running = [make_item(loop, 1, client="bulk"), make_item(loop, 1, client="bulk")]
    big, small = make_item(loop, 6, client="a"), make_item(loop, 1, client="b")
    q.put_nowait(big)
    q.put_nowait(small)
    assert c.newcomers(running, [], 4) == [big]  # larger than the cap: alone (the executor answers it in slices)
    assert c.newcomers(running, [big], 4) == [small]


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
