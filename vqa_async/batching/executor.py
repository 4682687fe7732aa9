"""The one thread that owns the model.

The batcher task (on the event loop) collects a batch and hands it here; this thread skips work nobody waits for,
runs the vision encoder once per distinct image not in the cache, answers every question in one call, and replies
to each request's future with `loop.call_soon_threadsafe`. A batch that raises is split and retried, so that only
a request that fails on its own gets an error; out-of-memory also lowers the batch cap for a while.

Preemption: while a batch runs in which a client holds more than its fair share, the batcher may hand over
(`preempt`) the requests of light clients that have nothing in it. The model thread answers them (all those
handed over since the last boundary in one call) at the running batch's next stage boundary (after each layer of
the vision, text and fusion encoders, between decoder steps), then goes on with the batch where it stopped: a client
with one question waits for one layer of a bulk client's batch, not for the whole batch. Preempting batches do not
preempt. They may take at most `preempt_share` of the model's time (a token bucket of one second): a call for one
question costs the model time of several questions in a batch, so a light client asking as fast as it is answered
would otherwise take most of the bulk client's throughput; past the budget its requests ride in the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from vqa_async.batching.cache import ImageEmbeddingCache
from vqa_async.batching.work import ImageNotCached, WorkItem
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.preprocess import EncodedQuestions

log = logging.getLogger(__name__)

OOM_COOLDOWN_S = 30.0
PREEMPT_WINDOW_S = 1.0  # the preemption budget's bucket holds `preempt_share` of this


class ItemFailed(Exception):
    """A request that failed on its own; `error_id` is in the log next to the traceback."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"the model failed on this request (error id {error_id})")
        self.error_id = error_id


class ModelFailing(ItemFailed):
    """Every request of a batch failed on its own: the model, not the request, is at fault, so another process
    may well answer it (a 503 that HAProxy retries, not a 500)."""


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class ModelExecutor:
    def __init__(self, metrics: Metrics, max_batch_size: int, cache: ImageEmbeddingCache,
                 sick_after_failures: int = 5, preempt_share: float = 0.5) -> None:
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.cache = cache
        self.sick_after_failures = sick_after_failures
        self.answerer: Answerer | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa-model")
        self._thread: threading.Thread | None = None
        self._cap = max_batch_size
        self._cap_until = 0.0
        # Preemption: batches handed over while a batch runs (deque: thread-safe append and popleft).
        self._urgent: deque[list[WorkItem]] = deque()
        self._in_urgent = False  # model thread only
        self._paused_s = 0.0  # model thread only: time the running batches spent paused for urgent ones
        self._paused_cpu_s = 0.0  # and the model thread's CPU time in those pauses
        self._loop: asyncio.AbstractEventLoop | None = None
        self.preempt_share = preempt_share
        self._budget_lock = threading.Lock()
        self._budget_s = preempt_share * PREEMPT_WINDOW_S  # seconds of model time preempting batches may take
        self._budget_at = time.monotonic()
        # Health, written by the model thread and read by the event loop (single assignments: no lock needed).
        self.failures_in_a_row = 0  # requests that failed in the model on their own, since the last success
        self.busy_since: float | None = None  # time.monotonic() when the running model call started
        metrics.batch_cap.set(max_batch_size)

    # -- lifetime ---------------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs `fn` on the model thread (loading the model there too, so one thread ever touches it)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def start(self, load: Callable[[], Answerer]) -> None:
        def _load() -> Answerer:
            self._thread = threading.current_thread()
            return load()

        self.answerer = await self.call(_load)

    def alive(self) -> bool:
        return self.answerer is not None and self._thread is not None and self._thread.is_alive()

    def busy_for(self, now: float) -> float:
        """How long the model call now running has run (0 when idle): a hung call grows without bound."""
        since = self.busy_since
        return 0.0 if since is None else now - since

    @property
    def sick(self) -> bool:
        """Every recent request failed in the model (a lasting CUDA error, say): stop taking work."""
        return self.failures_in_a_row >= self.sick_after_failures

    def probe(self, pixels: torch.Tensor, questions: EncodedQuestions) -> None:
        """Runs on the model thread: one canned question through the whole model. Success clears `sick`."""
        assert self.answerer is not None, "model not loaded"
        with self._busy():
            self.answerer.answer_embedded(self.answerer.encode_images(pixels[None]), questions)
        self.failures_in_a_row = 0

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Marks a model call in progress, for the stuck check (a preempting batch renews the mark)."""
        outer = self.busy_since
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None if outer is None else time.monotonic()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- batches ----------------------------------------------------------------------------------------------
    @property
    def cap(self) -> int:
        if self._cap < self.max_batch_size and time.monotonic() > self._cap_until:
            self._cap = min(self.max_batch_size, self._cap * 2)
            self._cap_until = time.monotonic() + OOM_COOLDOWN_S
            self.metrics.batch_cap.set(self._cap)
        return self._cap

    async def run(self, loop: asyncio.AbstractEventLoop, batch: list[WorkItem]) -> None:
        await self.call(self._run_batch, loop, batch)

    def may_preempt(self) -> bool:
        """Event loop: whether the preemption budget has time left."""
        return self._budget(0.0) > 0

    def _budget(self, spend: float) -> float:
        """Refills the budget for the time since the last call, takes `spend` seconds from it, returns it."""
        with self._budget_lock:
            now = time.monotonic()
            self._budget_s = min(self.preempt_share * PREEMPT_WINDOW_S,
                                 self._budget_s + self.preempt_share * (now - self._budget_at)) - spend
            self._budget_at = now
            return self._budget_s

    def preempt(self, batch: list[WorkItem]) -> None:
        """Event loop, while `run` is in progress: answer `batch` at the running batch's next stage boundary."""
        self._urgent.append(batch)

    def take_unstarted(self) -> list[list[WorkItem]]:
        """Event loop, once `run` has returned: the preempting batches that came too late to break in."""
        out = []
        with contextlib.suppress(IndexError):  # empty (at shutdown the model thread may still take from it)
            while True:
                out.append(self._urgent.popleft())
        return out

    def _pause(self) -> None:
        """Model thread, at a stage boundary of the running batch: answers the batches handed over meanwhile."""
        if self._in_urgent or not self._urgent:
            return
        assert self._loop is not None
        t0, cpu0 = time.monotonic(), time.thread_time()
        self._in_urgent = True
        try:
            while self._urgent:
                # Everything handed over since the last boundary, up to the cap, is one model call: newcomers
                # that break in together are batched together, never one call each.
                batch = list(self._urgent.popleft())
                size = sum(item.size for item in batch)
                while self._urgent and size + sum(item.size for item in self._urgent[0]) <= self._cap:
                    more = self._urgent.popleft()
                    batch += more
                    size += sum(item.size for item in more)
                self.metrics.preemptions.inc()
                self._run_batch(self._loop, batch)
        finally:
            self._in_urgent = False
            took = time.monotonic() - t0
            self._paused_s += took
            self._paused_cpu_s += time.thread_time() - cpu0
            self._budget(took)

    def _paused(self) -> tuple[float, float]:
        """Wall and CPU seconds spent in preempting batches so far: not the running batch's stage time."""
        return self._paused_s, self._paused_cpu_s

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[WorkItem]) -> None:
        failed: list[tuple[WorkItem, str]] = []
        self._loop = loop
        try:
            with self._busy():
                self._run_or_split(loop, batch, failed)
        finally:
            # Settled once the whole batch is known: if several requests were tried and none was answered,
            # the fault is the model's.
            systemic = len(failed) > 1 and len(failed) == len(batch)
            if failed:
                errors: list[Settlement] = [
                    (item.future, None, ModelFailing(eid) if systemic else ItemFailed(eid)) for item, eid in failed]
                loop.call_soon_threadsafe(_settle_all, errors)

    def _wanted(self, loop: asyncio.AbstractEventLoop, items: list[WorkItem]) -> list[WorkItem]:
        """The items someone still waits for and that can be answered; checked before every model call, retries
        included."""
        now = time.monotonic()
        live = []
        for item in items:
            reason = item.is_dead(now)
            if reason is None:
                live.append(item)
                continue
            self.metrics.dropped.labels(reason).inc()
            if reason == "deadline":
                loop.call_soon_threadsafe(_settle, item.future, None, TimeoutError("deadline passed in the queue"))
        return self._answerable(loop, live)

    def _answerable(self, loop: asyncio.AbstractEventLoop, items: list[WorkItem]) -> list[WorkItem]:
        """Fails alone, with ImageNotCached (a 409: send the image again), a follow-up by image id whose embedding
        left the cache since admission (evicted, or shrunk after out-of-memory) and that no upload of its batch
        brings. Nothing touches the cache between this check and `_answer`'s lookup."""
        brought = {item.image_key for item in items if item.pixels is not None}
        out = []
        for item in items:
            if item.pixels is None and item.image_key not in brought and not self.cache.holds(item.image_key):
                loop.call_soon_threadsafe(_settle, item.future, None, ImageNotCached(item.image_key))
            else:
                out.append(item)
        return out

    def _run_or_split(self, loop: asyncio.AbstractEventLoop, items: list[WorkItem],
                      failed: list[tuple[WorkItem, str]]) -> None:
        items = self._wanted(loop, items)
        if not items:
            return
        failure: BaseException | None = None
        slice_size = self._cap  # the most questions `_answer` gives the model in one call
        try:
            results = self._answer(items)
        except Exception as e:  # noqa: BLE001 - any failure: find who causes it, serve the others
            failure = e
        if failure is None:
            self.failures_in_a_row = 0
            # One wake-up of the event loop for the whole batch, not one per request.
            done: list[Settlement] = [(item.future, answers, None)
                                      for item, answers in zip(items, results, strict=True)]
            loop.call_soon_threadsafe(_settle_all, done)
            return
        # Out of the `except` block, and the traceback dropped: its frames hold the failed call's tensors, which
        # must be freed before the retry (on out-of-memory, above all).
        kind = "oom" if is_oom(failure) else "error"
        summary = f"{type(failure).__name__}: {failure}"
        trace = "".join(traceback.format_exception(failure)) if len(items) == 1 else ""
        failure.__traceback__ = None
        del failure
        self.metrics.batch_failures.labels(kind).inc()
        if kind == "oom":
            self._lower_cap(sum(i.size for i in items))
        if len(items) > 1:
            log.warning("a batch of %d requests failed (%s); splitting it", len(items), summary)
            half = len(items) // 2
            self._run_or_split(loop, items[:half], failed)
            self._run_or_split(loop, items[half:], failed)
            return
        if kind == "oom" and min(items[0].size, slice_size) > self._cap:  # answered in smaller slices now
            log.warning("a request of %d questions ran out of memory; retrying in slices of %d", items[0].size,
                        self._cap)
            self._run_or_split(loop, items, failed)
            return
        self.failures_in_a_row += 1
        error_id = uuid.uuid4().hex[:12]
        log.error("request failed in the model [error id %s]\n%s", error_id, trace.rstrip())
        failed.append((items[0], error_id))

    def _lower_cap(self, size: int) -> None:
        self._cap = max(1, min(self._cap, size) // 2)
        self._cap_until = time.monotonic() + OOM_COOLDOWN_S
        self.metrics.batch_cap.set(self._cap)
        self.cache.shrink(0.5)  # the cached embeddings share the device's memory with the model's activations
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of memory: batch cap lowered to %d for %.0fs", self._cap, OOM_COOLDOWN_S)

    def _answer(self, items: list[WorkItem]) -> list[list[Answered]]:
        assert self.answerer is not None, "model not loaded"
        t0 = time.monotonic()
        paused0 = self._paused_s
        for item in items:
            item.started_at = t0
            self.metrics.queue_wait.observe(t0 - item.enqueued_at)
        # One vision pass per distinct image that the cache does not hold.
        keys = list(dict.fromkeys(i.image_key for i in items))
        self.metrics.image_dedups.inc(len(items) - len(keys))  # requests that shared another's vision pass
        embeds: dict[str, torch.Tensor] = {}
        misses = []
        for k in keys:
            hit = self.cache.get(k)
            if hit is not None:
                embeds[k] = hit
            else:
                misses.append(k)
        self.metrics.cache_hits.inc(len(keys) - len(misses))
        self.metrics.cache_misses.inc(len(misses))
        if misses:
            # The pixels of each missing image: an upload brings them (a follow-up by id alone has none).
            first = {i.image_key: i.pixels for i in reversed(items) if i.pixels is not None}
            with self.metrics.stage("vision", self._paused):
                fresh = self.answerer.encode_images(torch.stack([first[k] for k in misses]), self._pause)
                if fresh.is_cuda:  # the stage's time is the GPU's, not that of queueing kernels
                    torch.cuda.synchronize(fresh.device)
            for k, e in zip(misses, fresh):
                embeds[k] = e
                # A row of a batch tensor would keep the whole batch alive in the cache: keep a copy of the row.
                self.cache.put(k, e.clone() if len(misses) > 1 else e)
        rows = [embeds[i.image_key] for i in items for _ in range(i.size)]
        questions = EncodedQuestions(torch.cat([i.input_ids for i in items]),
                                     torch.cat([i.attention_mask for i in items]))
        with self.metrics.stage("decoder", self._paused):
            stacked = torch.stack(rows)
            # A request may hold more questions than the cap that out-of-memory left: answer it in slices.
            step = self._cap  # at least 1
            answers = []
            for at in range(0, len(rows), step):
                answers += self.answerer.answer_embedded(stacked[at:at + step], EncodedQuestions(
                    questions.input_ids[at:at + step], questions.attention_mask[at:at + step]), pause=self._pause)
        n = sum(i.size for i in items)
        if len(answers) != n:  # every future is answered, with the answer that is its own
            raise RuntimeError(f"the model returned {len(answers)} answers for {n} questions")
        compute = time.monotonic() - t0 - (self._paused_s - paused0)  # not the preempting batches' time
        self.metrics.batch_size.observe(n)
        self.metrics.batch_images.observe(len(keys))
        self.metrics.compute.observe(compute)
        out, at = [], 0
        for item in items:
            item.compute_s, item.batch_size = compute, n
            out.append(answers[at:at + item.size])
            at += item.size
        return out


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]  # a future, its result, or its error


def _settle_all(done: list[Settlement]) -> None:
    for fut, result, error in done:
        _settle(fut, result, error)
