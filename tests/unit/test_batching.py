"""The batch collector, without HTTP (the model thread's tests: test_batch_runner.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.work import WorkItem
from vqa_async.core.adapter import VqaPayload


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
