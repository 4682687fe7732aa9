"""Batch collection: one function with the deadline arithmetic, testable without HTTP or a model."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from vqa_async.batching.work import WorkItem


class BatchCollector:
    """Takes work from the queue in batches of at most `max_size` questions.

    An idle server adds no latency: the first item is taken as soon as it arrives, and the collector waits up to
    `max_wait_s` for more only while waiting can pay: while `incoming()` says requests are on their way
    (accepted, being preprocessed), and while the clients the last batch answered are coming back. A client
    that asks its next question as soon as it has an answer (a bulk job, a script, the bench) is back within
    a round trip, but the requests of several such clients arrive a little apart; without this wait the first
    of them would go alone and the rest would make the next batch, and the two halves would then alternate
    for good. `answered(n)` tells the collector that n requests were just answered: it then waits for up to n
    arrivals (any client's: it cannot know whose), at most until `return_window_s` after that answer (whatever
    `max_wait_s` is), so a client that does not come back costs one such window and an idle server none.
    Everything already queued is always taken at once.

    With `fair` (the default), what is queued is sorted into one line per client (`WorkItem.client`) and each
    batch is filled round-robin across the lines, `WorkItem.weight` requests per client per round: a client
    with 64 requests queued does not push one with a single request to the back. Within a client the order is
    FIFO. A request that does not fit waits at the head of its line for the next batch; the next batch begins
    with the clients that the last one served least recently. With a single client (or `fair=False`, which puts
    every request in one line) batches are exactly those of a FIFO queue.

    While a batch runs, `newcomers` takes the requests of light clients (all they have queued fits in one round)
    that have nothing in it, for the model thread to answer inside that batch (see `preemption.py`), but only
    while some client holds more than its fair share of that batch (`over_share`): a light client is protected
    from a bulk one, and many people asking one question each (where nobody holds more than a round) are never
    split into calls of their own, which would cost each of them several batched questions' model time. A bulk
    client never breaks in: it gets its share in the next batch, as a batch of its own would make it wait.
    """

    def __init__(self, queue: asyncio.Queue[WorkItem], max_size: int, max_wait_s: float,
                 incoming: Callable[[], int] = lambda: 0, clock: Callable[[], float] = time.monotonic,
                 fair: bool = True, return_window_s: float | None = None) -> None:
        self.queue = queue
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.incoming = incoming
        self.clock = clock
        self.fair = fair
        self.return_window_s = max_wait_s if return_window_s is None else return_window_s
        # Requests answered by the last batch whose clients have not come back yet (arrivals since count them
        # off), and until when they are waited for.
        self._returning = 0
        self._answered_at = float("-inf")
        # Taken from the queue, not yet in a batch: one FIFO line per client, in the order they are served.
        self._lines: dict[str, deque[WorkItem]] = {}
        self._held = 0

    def pending(self) -> int:
        return self.queue.qsize() + self._held

    def _hold(self, item: WorkItem) -> None:
        self._lines.setdefault(item.client if self.fair else "", deque()).append(item)
        self._held += 1
        if self._returning and item.enqueued_at >= self._answered_at:
            self._returning -= 1

    def answered(self, requests: int, more: bool = False) -> None:
        """`requests` were just answered: their clients may be on their way back (see the class). `more`: they
        were answered right after the last batch (requests handed over as it ended), so they add to its count and
        its window stays."""
        if more:
            self._returning += requests
            return
        self._returning = requests
        self._answered_at = self.clock()

    def _return_wait(self, now: float) -> float:
        """How long to wait for clients the last batch answered: 0 when none is expected any more."""
        return self._answered_at + self.return_window_s - now if self._returning else 0.0

    def _drain(self) -> None:
        while not self.queue.empty():
            self._hold(self.queue.get_nowait())

    async def collect(self, cap: int | None = None) -> list[WorkItem]:
        limit = min(self.max_size, cap or self.max_size)
        if not self._held:
            self._hold(await self.queue.get())
        deadline = self.clock() + self.max_wait_s
        batch: list[WorkItem] = []
        size = 0
        while True:
            self._drain()
            size = self._fill(batch, size, limit)
            if size >= limit or self._held:  # full, or what is left does not fit
                break
            now = self.clock()
            # While requests are being preprocessed, up to max_wait_s; else only for the clients just answered,
            # until return_window_s after their answer.
            remaining = deadline - now if self.incoming() else self._return_wait(now)
            if remaining <= 0:
                break
            try:
                self._hold(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def take_all(self) -> list[WorkItem]:
        """Everything queued or held, for a shutdown to answer."""
        self._drain()
        items = [item for line in self._lines.values() for item in line]
        self._lines.clear()
        self._held = 0
        return items

    async def arrival(self) -> None:
        """Returns once a request has arrived (it is held, for `newcomers` or the next batch)."""
        self._hold(await self.queue.get())

    def newcomers(self, running: list[WorkItem], handed: list[WorkItem], limit: int) -> list[WorkItem]:
        """Up to `limit` questions of the held requests of light clients (whose line holds no more than one
        round, `weight` requests) with nothing in `running` (the batch in the model) or `handed` (requests handed
        over and not yet answered), taken only while a client of `running` holds more than its fair share of it
        (see `over_share`)."""
        self._drain()
        busy = {item.client for item in running} | {item.client for item in handed}
        if not over_share(running, busy | set(self._lines)):
            return []
        batch: list[WorkItem] = []
        size = 0
        for client in [c for c in self._lines if c not in busy]:
            line = self._lines[client]
            if len(line) > max(1, line[0].weight):
                continue
            while line:
                if batch and size + line[0].size > limit:
                    break
                item = line.popleft()
                batch.append(item)
                self._held -= 1
                size += item.size
            if not line:
                del self._lines[client]
        return batch

    def _fill(self, batch: list[WorkItem], size: int, limit: int) -> int:
        """Adds held items round-robin across clients until the batch is full or nothing else fits."""
        blocked: set[str] = set()  # clients whose next request does not fit in this batch
        reached: list[str] = []  # clients the last round that took anything took from
        while size < limit:
            this_round: list[str] = []
            for client in list(self._lines):
                if client in blocked:
                    continue
                line = self._lines[client]
                share, took = max(1, line[0].weight), 0
                while line and took < share:
                    # An empty batch takes its first request whatever its size (a cap lowered after
                    # out-of-memory may be smaller than a request: the executor answers it in slices).
                    if batch and size + line[0].size > limit:
                        blocked.add(client)
                        break
                    item = line.popleft()
                    batch.append(item)
                    self._held -= 1
                    size += item.size
                    took += 1
                if not line:
                    del self._lines[client]
                if took:
                    this_round.append(client)
                if size >= limit:
                    break
            if not this_round:
                break
            reached = this_round
        # Whoever the last round reached goes to the back: the next batch starts with those it did not reach.
        for client in reached:
            if client in self._lines:
                self._lines[client] = self._lines.pop(client)
        return size


def over_share(running: list[WorkItem], clients: set[str]) -> bool:
    """Whether a client of the `running` batch holds more than its fair share of it while `clients` (everyone
    with work in the batch, handed over or waiting) want the model: more than one round of requests (its
    `weight`) and more than `1 / len(clients)` of the batch's questions. One request is never more than a share,
    however many questions it asks: a person's questions about one image are not a bulk client's backlog."""
    requests: dict[str, int] = {}
    questions: dict[str, int] = {}
    weight: dict[str, int] = {}
    for item in running:
        requests[item.client] = requests.get(item.client, 0) + 1
        questions[item.client] = questions.get(item.client, 0) + item.size
        weight[item.client] = max(1, item.weight)
    fair = sum(questions.values()) / max(1, len(clients))
    return any(requests[c] > weight[c] and questions[c] > fair for c in requests)
