"""The one thread that owns the model, and what it does with any batch, whatever the model.

The batcher task (on the event loop) collects a batch and hands it here. This thread skips work nobody waits for
(deadline passed, client gone), lets the adapter refuse requests it cannot answer, runs the rest through the
adapter in one call, and replies to every request's future, with the call's timings, in one
`loop.call_soon_threadsafe`. A batch that raises is split and retried, so that only a request that fails on its
own gets an error; out-of-memory also lowers the batch cap for a while (the adapter frees what it can). Preemption
(`preemption.py`) runs other batches inside a running one, at the boundaries where the adapter calls it.

The runner never sees a model's inputs: those are the adapter's (`BatchAdapter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from vqa_async.batching.preemption import Preemption
from vqa_async.batching.work import Done, WorkItem
from vqa_async.metrics import Metrics
from vqa_async.otel import hooks

log = logging.getLogger(__name__)

P = TypeVar("P")

OOM_COOLDOWN_S = 30.0


class ItemFailed(Exception):
    """A request that failed on its own; `error_id` is in the log next to the traceback."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"the model failed on this request (error id {error_id})")
        self.error_id = error_id


class ModelFailing(ItemFailed):
    """Every request of a batch failed on its own: the model, not the request, is at fault, so another process
    may well answer it (a 503 that HAProxy retries, not a 500)."""


class Boundary(Protocol):
    """What the adapter calls at a stage boundary of a running batch, and asks for the time spent there."""

    def __call__(self) -> None: ...

    def spent(self) -> tuple[float, float]: ...


class BatchAdapter(Protocol[P]):
    """The model's side of the runner: everything that knows what a payload is."""

    def prepare(self, payloads: list[P]) -> list[BaseException | None]:
        """Before each model call, retries included: for each payload, an error to fail it with alone (the
        request cannot be answered), or None."""
        ...

    def run(self, payloads: list[P], cap: int, boundary: Boundary) -> list[Any]:
        """One model call: one result per payload, in order. At most `cap` units of size go through the model at
        once (a payload larger than a lowered cap is answered in slices). Calls `boundary()` between stages."""
        ...

    def is_oom(self, error: BaseException) -> bool: ...

    def on_oom(self) -> None:
        """Out of memory: free what can be freed (caches) before the retry."""
        ...

    def probe(self) -> None:
        """One canned request through the whole model; raises if the model cannot answer."""
        ...


Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]  # a future, its result, or its error


class BatchRunner(Generic[P]):
    def __init__(self, metrics: Metrics, max_batch_size: int, sick_after_failures: int = 5,
                 preempt_share: float = 0.5) -> None:
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.sick_after_failures = sick_after_failures
        self.adapter: BatchAdapter[P] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa-model")
        self._thread: threading.Thread | None = None
        self._cap = max_batch_size
        self._cap_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.preemption = Preemption(preempt_share, metrics, self._run_urgent, lambda: self._cap)
        # Health, written by the model thread and read by the event loop (single assignments: no lock needed).
        self.failures_in_a_row = 0  # requests that failed in the model on their own, since the last success
        self.busy_since: float | None = None  # time.monotonic() when the running model call started
        metrics.batch_cap.set(max_batch_size)

    # -- lifetime ---------------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs `fn` on the model thread (loading the model there too, so one thread ever touches it)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def start(self, load: Callable[[], BatchAdapter[P]]) -> None:
        def _load() -> BatchAdapter[P]:
            self._thread = threading.current_thread()
            return load()

        self.adapter = await self.call(_load)

    def alive(self) -> bool:
        return self.adapter is not None and self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- health -----------------------------------------------------------------------------------------------
    def busy_for(self, now: float) -> float:
        """How long the model call now running has run (0 when idle): a hung call grows without bound."""
        since = self.busy_since
        return 0.0 if since is None else now - since

    @property
    def sick(self) -> bool:
        """Every recent request failed in the model (a lasting CUDA error, say): stop taking work."""
        return self.failures_in_a_row >= self.sick_after_failures

    def probe(self) -> None:
        """Runs on the model thread: the adapter's canned request. Success clears `sick`."""
        assert self.adapter is not None, "model not loaded"
        with self._busy():
            self.adapter.probe()
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

    # -- batches ----------------------------------------------------------------------------------------------
    @property
    def cap(self) -> int:
        if self._cap < self.max_batch_size and time.monotonic() > self._cap_until:
            self._cap = min(self.max_batch_size, self._cap * 2)
            self._cap_until = time.monotonic() + OOM_COOLDOWN_S
            self.metrics.batch_cap.set(self._cap)
        return self._cap

    async def run(self, loop: asyncio.AbstractEventLoop, batch: list[WorkItem[P]]) -> None:
        self._loop = loop
        await self.call(self._run_batch, loop, batch)

    def _run_urgent(self, batch: list[WorkItem[Any]]) -> None:
        assert self._loop is not None
        self._run_batch(self._loop, batch)

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[WorkItem[P]]) -> None:
        failed: list[tuple[WorkItem[P], str]] = []
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

    def _wanted(self, loop: asyncio.AbstractEventLoop, items: list[WorkItem[P]]) -> list[WorkItem[P]]:
        """The items someone still waits for and the adapter can answer; checked before every model call,
        retries included."""
        assert self.adapter is not None, "model not loaded"
        now = time.monotonic()
        live: list[WorkItem[P]] = []
        refused: list[Settlement] = []
        for item in items:
            reason = item.is_dead(now)
            if reason is None:
                live.append(item)
                continue
            self.metrics.dropped.labels(reason).inc()
            if reason == "deadline":
                refused.append((item.future, None, TimeoutError("deadline passed in the queue")))
        out = []
        for item, error in zip(live, self.adapter.prepare([item.payload for item in live]), strict=True):
            if error is None:
                out.append(item)
            else:
                refused.append((item.future, None, error))
        if refused:
            loop.call_soon_threadsafe(_settle_all, refused)
        return out

    def _run_or_split(self, loop: asyncio.AbstractEventLoop, items: list[WorkItem[P]],
                      failed: list[tuple[WorkItem[P], str]]) -> None:
        items = self._wanted(loop, items)
        if not items:
            return
        assert self.adapter is not None
        failure: BaseException | None = None
        slice_size = self._cap  # the most units `run` gives the model in one go
        try:
            done = self._answer(items)
        except Exception as e:  # noqa: BLE001 - any failure: find who causes it, serve the others
            failure = e
        if failure is None:
            self.failures_in_a_row = 0
            loop.call_soon_threadsafe(_settle_all, done)  # one wake-up of the event loop for the whole batch
            return
        # Out of the `except` block, and the traceback dropped: its frames hold the failed call's tensors, which
        # must be freed before the retry (on out-of-memory, above all).
        kind = "oom" if self.adapter.is_oom(failure) else "error"
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
            log.warning("a request of size %d ran out of memory; retrying in slices of %d", items[0].size,
                        self._cap)
            self._run_or_split(loop, items, failed)
            return
        self.failures_in_a_row += 1
        error_id = uuid.uuid4().hex[:12]
        log.error("request failed in the model [error id %s]\n%s", error_id, trace.rstrip())
        failed.append((items[0], error_id))

    def _lower_cap(self, size: int) -> None:
        assert self.adapter is not None
        self._cap = max(1, min(self._cap, size) // 2)
        self._cap_until = time.monotonic() + OOM_COOLDOWN_S
        self.metrics.batch_cap.set(self._cap)
        self.adapter.on_oom()
        log.warning("out of memory: batch cap lowered to %d for %.0fs", self._cap, OOM_COOLDOWN_S)

    def _answer(self, items: list[WorkItem[P]]) -> list[Settlement]:
        assert self.adapter is not None
        t0 = time.monotonic()
        paused0 = self.preemption.spent()[0]
        for item in items:
            self.metrics.queue_wait.observe(t0 - item.enqueued_at)
        n = sum(item.size for item in items)
        with hooks.batch(items, n) as trace:  # one span per model call, when traced
            results = self.adapter.run([item.payload for item in items], self._cap, self.preemption)
            if len(results) != len(items):  # every future is answered, with the result that is its own
                raise RuntimeError(f"the model returned {len(results)} results for {len(items)} requests")
        compute = time.monotonic() - t0 - (self.preemption.spent()[0] - paused0)  # not the preempting calls'
        self.metrics.batch_size.observe(n)
        self.metrics.compute.observe(compute)
        return [(item.future, Done(result, t0, compute, n, trace), None)
                for item, result in zip(items, results, strict=True)]


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _settle_all(done: list[Settlement]) -> None:
    for fut, result, error in done:
        _settle(fut, result, error)
