"""The application core: the request path below HTTP. Admission, readiness, and ask().

    ask() -> preprocess (thread pool) -> queue -> the batch loop (batching/loop.py: BatchCollector ->
          BatchRunner on the model thread -> VqaAdapter)
          <- future (Done: answers and timings)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.loop import run_batches
from vqa_async.batching.runner import BatchRunner
from vqa_async.batching.work import Done, WorkItem
from vqa_async.config import Settings
from vqa_async.core.adapter import ImageNotCached, VqaAdapter, VqaPayload
from vqa_async.core.cache import ImageEmbeddingCache
from vqa_async.core.image_ids import cache_key
from vqa_async.core.image_ids import image_id as id_of_image
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.loader import LoadedModel, load_model
from vqa_async.model.preprocess import UploadPixels
from vqa_async.otel import hooks

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
    image_id: str = ""  # the image's id for the client who asked (core/image_ids.py), for follow-ups


class VqaService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loaded: LoadedModel | None = None
        self.queue: asyncio.Queue[WorkItem[VqaPayload]] = asyncio.Queue(maxsize=settings.max_queue)
        self.cache = ImageEmbeddingCache(settings.image_cache_entries, int(settings.image_cache_mb * 2**20))
        self.runner: BatchRunner[VqaPayload] = BatchRunner(metrics, settings.max_batch_size,
                                                           settings.sick_after_failures, settings.preempt_share)
        self._incoming = 0  # accepted requests still being preprocessed: the collector waits for them
        self.collector = BatchCollector(self.queue, settings.max_batch_size, settings.max_wait_ms / 1000,
                                        incoming=lambda: self._incoming, fair=settings.scheduling == "fair",
                                        return_window_s=settings.return_window_ms / 1000)
        self._prep_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="vqa-preprocess")
        self._inline_bytes = int(settings.inline_prepare_kb * 1024)
        self._batcher: asyncio.Task[None] | None = None
        self._upload: UploadPixels | None = None
        self.draining = False  # set on SIGTERM with --drain-s: out of rotation before the socket closes
        self._probe: asyncio.Future[None] | None = None
        self._probe_at = 0.0

    def waiting(self) -> int:
        """Requests accepted and not yet in a model call: uploads being decoded, the queue and the collector's
        lines (the autoscaling signal, `vqa_requests_waiting`)."""
        return self._incoming + self.collector.pending()

    @property
    def model_name(self) -> str:
        return self.loaded.name if self.loaded else "?"

    # -- lifetime ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings

        def load() -> VqaAdapter:
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            self.loaded = loaded = load_model(s.model, device=s.device, dtype=s.dtype)
            answerer = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype, decoder=s.decoder)
            # The probe's canned question (while sick, see _start_probe): a blank image.
            probe = (torch.zeros(3, loaded.image_res, loaded.image_res, dtype=torch.uint8),
                     loaded.tokenizer.encode(["what is in the picture?"]))
            return VqaAdapter(answerer, self.cache, self.metrics, probe)

        await self.runner.start(load)
        assert self.loaded is not None
        self._upload = UploadPixels(self.loaded.image_res, s.max_pixels, exact=s.exact_preprocess,
                                    device=self.loaded.device if s.gpu_decode else None)
        preempt = self.collector.fair and s.preempt_share > 0
        self._batcher = asyncio.create_task(run_batches(self.collector, self.runner, self.metrics, preempt),
                                            name="vqa-batcher")
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
        waiting = self.collector.take_all() + [
            item for batch in self.runner.preemption.take_unstarted() for item in batch]
        for item in waiting:
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down"))
                left += 1
        if left:
            log.warning("shutdown: %d queued requests were not answered", left)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self.runner.shutdown()

    # -- health -----------------------------------------------------------------------------------------------
    def liveness_problem(self) -> str | None:
        """Why this process can no longer answer and needs a restart (/healthz); None while it can."""
        if self._batcher is not None and self._batcher.done():
            return "the batcher task has stopped"
        if self.loaded is not None and not self.runner.alive():
            return "the model thread has stopped"
        busy = self.runner.busy_for(time.monotonic())
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
        if self.runner.sick:
            self._start_probe()
            return f"the last {self.runner.failures_in_a_row} requests failed in the model"
        return None

    def ready(self) -> bool:
        return self.readiness_problem() is None

    def _start_probe(self) -> None:
        """While sick, one canned question every PROBE_INTERVAL_S: a success puts the process back in service."""
        now = time.monotonic()
        if (self._probe is not None and not self._probe.done()) or now - self._probe_at < PROBE_INTERVAL_S:
            return
        self._probe_at = now
        self._probe = asyncio.ensure_future(self.runner.call(self.runner.probe))
        self._probe.add_done_callback(_log_probe)

    # -- the request path -------------------------------------------------------------------------------------
    async def ask(self, image: bytes | None, questions: list[str], client: str = "", weight: int = 1,
                  image_id: str | None = None, scope: bytes = b"") -> Outcome:
        """Raises ImageError (bad upload), ImageNotCached, Overloaded, NotReady, TimeoutError, or ItemFailed.
        `client` and `weight` are who asks and their share, for the collector's round-robin. A follow-up names
        its image by `image_id` (a previous Outcome's) instead of sending it: nothing is decoded, and the
        embedding comes from the cache, or ImageNotCached. `scope` is the client's (core/image_ids.py): with API
        keys, image ids and cache entries are the asking client's own."""
        arrived = time.monotonic()
        if problem := self.readiness_problem():
            raise NotReady(problem)
        if image_id is not None and not self.cache.holds(cache_key(image_id, scope)):  # the model thread checks again
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
            if image is not None and len(image) <= self._inline_bytes:
                # --inline-prepare-kb: a small upload (the demo's 1 KB PNGs) decoded on the loop at once, without
                # the hand-over to the pool and back. Off by default: the ablation did not show it (RESULTS.md).
                answered, prepared = self._prepare(image, questions, scope)
            elif image is not None:
                answered, prepared = await hooks.traced("decode", loop.run_in_executor(
                    self._prep_pool, self._prepare, image, questions, scope))
            else:
                assert image_id is not None, "ask() needs an image or an image_id"
                answered = image_id
                prepared = await hooks.traced("tokenize", loop.run_in_executor(
                    self._prep_pool, self._follow_up, cache_key(image_id, scope), questions))
        finally:
            self._incoming -= 1
        preprocess_s = time.monotonic() - arrived
        self.metrics.preprocess.observe(preprocess_s)
        deadline = arrived + self.settings.timeout_s
        item = WorkItem(prepared, prepared.size, loop.create_future(), deadline, client=client, weight=weight,
                        trace=hooks.current())
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.dropped.labels("overloaded").inc()
            raise Overloaded("the queue is full") from None
        self.metrics.queue_depth.set(self.collector.pending())
        done: Done[list[Answered]] = await asyncio.wait_for(item.future, max(0.0, deadline - time.monotonic()))
        hooks.waited(item.enqueued_at, done.started_at, done.trace, done.batch_size)
        return Outcome(done.result, round((done.started_at - item.enqueued_at) * 1000, 2),
                       round(done.compute_s * 1000, 2), done.batch_size, round(preprocess_s * 1000, 2),
                       answered)

    def _follow_up(self, key: str, questions: list[str]) -> VqaPayload:
        """A follow-up by image id (`key`: its cache key): only its questions to encode."""
        assert self.loaded is not None
        with self.metrics.stage("preprocess"):
            enc = self.loaded.tokenizer.encode(questions)
        return VqaPayload(key, None, enc.input_ids, enc.attention_mask)

    def _prepare(self, image: bytes, questions: list[str], scope: bytes) -> tuple[str, VqaPayload]:
        """The image's id for the client of `scope`, and the request's inputs."""
        assert self.loaded is not None and self._upload is not None
        with self.metrics.stage("decode"):
            decoded = self._upload.decode(image)
        with self.metrics.stage("preprocess"):
            image_id = id_of_image(image, scope)
            pixels = self._upload.pixels(decoded)
            enc = self.loaded.tokenizer.encode(questions)
        return image_id, VqaPayload(cache_key(image_id, scope), pixels, enc.input_ids, enc.attention_mask)
