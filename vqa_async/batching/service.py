"""The request path below HTTP: preprocess off the loop, queue, batch, answer.

    ask() -> preprocess (thread pool) -> queue -> BatchCollector -> ModelExecutor (model thread) -> future
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vqa_async.batching.cache import ImageEmbeddingCache
from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.executor import ModelExecutor
from vqa_async.batching.work import ImageNotCached, WorkItem
from vqa_async.config import Settings
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.loader import LoadedModel, load_model
from vqa_async.model.preprocess import UploadPixels

log = logging.getLogger(__name__)


PROBE_INTERVAL_S = 2.0


def _log_probe(fut: asyncio.Future[None]) -> None:
    if fut.cancelled():
        return
    if fut.exception() is not None:
        log.warning("health probe failed: %s", fut.exception())
    else:
        log.info("health probe answered: the model is back in service")


class Overloaded(Exception):
    """The queue is full: answer 503 at once so that the balancer can try another process."""


class NotReady(Exception):
    """The model is not loaded (yet, or any more)."""


@dataclass(frozen=True)
class Outcome:
    answers: list[Answered]
    queue_ms: float
    compute_ms: float
    batch_size: int
    preprocess_ms: float = 0.0
    image_id: str = ""  # the sha256 of the image's bytes: the key of its cached embedding, for follow-ups


@dataclass(frozen=True)
class Prepared:
    key: str
    pixels: torch.Tensor | None  # None: a follow-up by image id
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class VqaService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loaded: LoadedModel | None = None
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue(maxsize=settings.max_queue)
        self.cache = ImageEmbeddingCache(settings.image_cache_entries, int(settings.image_cache_mb * 2**20))
        self.executor = ModelExecutor(metrics, settings.max_batch_size, self.cache, settings.sick_after_failures,
                                      settings.preempt_share)
        self._incoming = 0  # accepted requests still being preprocessed: the collector waits for them
        self.collector = BatchCollector(self.queue, settings.max_batch_size, settings.max_wait_ms / 1000,
                                        incoming=lambda: self._incoming, fair=settings.scheduling == "fair")
        self._prep_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="vqa-preprocess")
        self._batcher: asyncio.Task[None] | None = None
        self._upload: UploadPixels | None = None
        self.draining = False  # set on SIGTERM with --drain-s: out of rotation before the socket closes
        self._probe: asyncio.Future[None] | None = None
        self._probe_at = 0.0

    @property
    def model_name(self) -> str:
        return self.loaded.name if self.loaded else "?"

    # -- lifetime ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings

        def load() -> Answerer:
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            self.loaded = load_model(s.model, device=s.device, dtype=s.dtype)
            return Answerer(self.loaded.model, self.loaded.tokenizer, self.loaded.device, self.loaded.dtype,
                            decoder=s.decoder)

        await self.executor.start(load)
        assert self.loaded is not None
        self._upload = UploadPixels(self.loaded.image_res, s.max_pixels, exact=s.exact_preprocess,
                                    device=self.loaded.device if s.gpu_decode else None)
        self._batcher = asyncio.create_task(self._run_batches(), name="vqa-batcher")
        log.info("ready: model %s on %s, %s decoder, max batch %d questions, max wait %.1f ms, queue %d, "
                 "%d model threads, %d preprocessing threads", self.model_name, s.device, s.decoder,
                 s.max_batch_size, s.max_wait_ms, s.max_queue, torch.get_num_threads(), s.preprocess_threads)

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        left = 0
        # Queued, held by the collector between batches, or handed over for preemption and not started.
        waiting = self.collector.take_all() + [item for batch in self.executor.take_unstarted() for item in batch]
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down"))
                left += 1
        if left:
            log.warning("shutdown: %d queued requests were not answered", left)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown()

    # -- health -----------------------------------------------------------------------------------------------
    def liveness_problem(self) -> str | None:
        """Why this process can no longer answer and needs a restart (/healthz); None while it can."""
        if self._batcher is not None and self._batcher.done():
            return "the batcher task has stopped"
        if self.loaded is not None and not self.executor.alive():
            return "the model thread has stopped"
        busy = self.executor.busy_for(time.monotonic())
        if busy > self.settings.stuck_timeout_s:
            return f"a model call has been running for {busy:.0f} s (stuck past {self.settings.stuck_timeout_s:g} s)"
        return None

    def readiness_problem(self) -> str | None:
        """Why this process should get no traffic now (/readyz, and a 503 that HAProxy retries elsewhere)."""
        if self.draining:
            return "the server is shutting down"
        if self.loaded is None or self._batcher is None:
            return "the model is not loaded"
        if problem := self.liveness_problem():
            return problem
        if self.executor.sick:
            self._start_probe()
            return f"the last {self.executor.failures_in_a_row} requests failed in the model"
        return None

    def ready(self) -> bool:
        return self.readiness_problem() is None

    def _start_probe(self) -> None:
        """While sick, one canned question every PROBE_INTERVAL_S: a success puts the process back in service."""
        now = time.monotonic()
        if (self._probe is not None and not self._probe.done()) or now - self._probe_at < PROBE_INTERVAL_S:
            return
        assert self.loaded is not None
        self._probe_at = now
        res = self.loaded.image_res
        pixels = torch.zeros(3, res, res, dtype=torch.uint8)
        questions = self.loaded.tokenizer.encode(["what is in the picture?"])
        self._probe = asyncio.ensure_future(self.executor.call(self.executor.probe, pixels, questions))
        self._probe.add_done_callback(_log_probe)

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.collector.collect(self.executor.cap)
            self.metrics.queue_depth.set(self.collector.pending())
            await self._run(loop, batch)
            for late in self.executor.take_unstarted():  # handed over as the batch ended: they go first
                await self._run(loop, late)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[WorkItem]) -> None:
        run = asyncio.ensure_future(self.executor.run(loop, batch))
        try:
            if self.collector.fair and self.settings.preempt_share > 0:
                await self._hand_over_newcomers(run, batch)
            await run
        except Exception as e:  # the executor settles its own failures; this is a bug, keep serving
            log.exception("batch runner failed")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
        finally:
            run.cancel()  # when the batcher itself is cancelled (shutdown); a no-op once the batch has run

    async def _hand_over_newcomers(self, run: asyncio.Future[None], batch: list[WorkItem]) -> None:
        """While `run` runs a batch in which a client holds more than its fair share: the requests of light
        clients with nothing in progress go to the executor at once, to be answered at the batch's next stage
        boundary instead of after it (those handed over before a boundary are answered there in one call). A
        client whose handed-over request has been answered may break in again (a client at concurrency 1 asks
        again within one bulk batch)."""
        handed: list[WorkItem] = []
        arrival: asyncio.Future[None] | None = None
        try:
            while True:
                handed = [item for item in handed if not item.future.done()]
                if self.executor.may_preempt() and (
                        newcomers := self.collector.newcomers(batch, handed, self.executor.cap)):
                    handed += newcomers
                    self.executor.preempt(newcomers)
                    self.metrics.queue_depth.set(self.collector.pending())
                arrival = asyncio.ensure_future(self.collector.arrival())
                await asyncio.wait((run, arrival), return_when=asyncio.FIRST_COMPLETED)
                if run.done():
                    return
        finally:
            if arrival is not None:
                arrival.cancel()  # a request it has not taken stays in the queue
                with contextlib.suppress(asyncio.CancelledError):
                    await arrival

    # -- the request path -------------------------------------------------------------------------------------
    async def ask(self, image: bytes | None, questions: list[str], client: str = "", weight: int = 1,
                  image_id: str | None = None) -> Outcome:
        """Raises ImageError (bad upload), ImageNotCached, Overloaded, NotReady, TimeoutError, or ItemFailed.
        `client` and `weight` are who asks and their share, for the collector's round-robin. A follow-up names
        its image by `image_id` (a previous Outcome's) instead of sending it: nothing is decoded, and the
        embedding comes from the cache, or ImageNotCached."""
        arrived = time.monotonic()
        if problem := self.readiness_problem():
            raise NotReady(problem)
        if image_id is not None and not self.cache.holds(image_id):  # the model thread checks again
            raise ImageNotCached(image_id)
        # Admission counts the uploads still being decoded, so that under overload no CPU goes into decoding
        # what would then be refused.
        if (self._incoming >= self.settings.max_preprocess_backlog
                or self._incoming + self.collector.pending() >= self.settings.max_queue):
            self.metrics.dropped.labels("overloaded").inc()
            raise Overloaded("the queue is full")
        loop = asyncio.get_running_loop()
        self._incoming += 1
        try:
            if image is not None:
                prepared = await loop.run_in_executor(self._prep_pool, self._prepare, image, questions)
            else:
                assert image_id is not None, "ask() needs an image or an image_id"
                prepared = await loop.run_in_executor(self._prep_pool, self._follow_up, image_id, questions)
        finally:
            self._incoming -= 1
        preprocess_s = time.monotonic() - arrived
        self.metrics.preprocess.observe(preprocess_s)
        deadline = arrived + self.settings.timeout_s
        item = WorkItem(prepared.key, prepared.pixels, prepared.input_ids, prepared.attention_mask,
                        loop.create_future(), deadline, client=client, weight=weight)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.dropped.labels("overloaded").inc()
            raise Overloaded("the queue is full") from None
        self.metrics.queue_depth.set(self.collector.pending())
        answers = await asyncio.wait_for(item.future, max(0.0, deadline - time.monotonic()))
        return Outcome(answers, round((item.started_at - item.enqueued_at) * 1000, 2),
                       round(item.compute_s * 1000, 2), item.batch_size, round(preprocess_s * 1000, 2), item.image_key)

    def _follow_up(self, image_id: str, questions: list[str]) -> Prepared:
        """A follow-up by image id: only its questions to encode."""
        assert self.loaded is not None
        with self.metrics.stage("preprocess"):
            enc = self.loaded.tokenizer.encode(questions)
        return Prepared(image_id, None, enc.input_ids, enc.attention_mask)

    def _prepare(self, image: bytes, questions: list[str]) -> Prepared:
        assert self.loaded is not None and self._upload is not None
        with self.metrics.stage("decode"):
            decoded = self._upload.decode(image)
        with self.metrics.stage("preprocess"):
            key = hashlib.sha256(image).hexdigest()
            pixels = self._upload.pixels(decoded)
            enc = self.loaded.tokenizer.encode(questions)
        return Prepared(key, pixels, enc.input_ids, enc.attention_mask)
