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
from vqa_async.batching.work import WorkItem
from vqa_async.config import Settings
from vqa_async.metrics import Metrics
from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.loader import LoadedModel, load_model
from vqa_async.model.preprocess import UploadPixels

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Prepared:
    key: str
    pixels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class VqaService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loaded: LoadedModel | None = None
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue(maxsize=settings.max_queue)
        self.cache = ImageEmbeddingCache(settings.image_cache_entries, int(settings.image_cache_mb * 2**20))
        self.executor = ModelExecutor(metrics, settings.max_batch_size, self.cache)
        self._incoming = 0  # accepted requests still being preprocessed: the collector waits for them
        self.collector = BatchCollector(self.queue, settings.max_batch_size, settings.max_wait_ms / 1000,
                                        incoming=lambda: self._incoming)
        self._prep_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="vqa-preprocess")
        self._batcher: asyncio.Task[None] | None = None
        self._upload: UploadPixels | None = None

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
        log.info("ready: model %s on %s, %s decoder, max batch %d questions, max wait %.1f ms, queue %d",
                 self.model_name, s.device, s.decoder, s.max_batch_size, s.max_wait_ms, s.max_queue)

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
        left = 0
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(NotReady("the server is shutting down"))
                left += 1
        if left:
            log.warning("shutdown: %d queued requests were not answered", left)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown()

    def ready(self) -> bool:
        return self.executor.alive() and self._batcher is not None and not self._batcher.done()

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.collector.collect(self.executor.cap)
            self.metrics.queue_depth.set(self.collector.pending())
            try:
                await self.executor.run(loop, batch)
            except Exception as e:  # the executor settles its own failures; this is a bug, keep serving
                log.exception("batch runner failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)

    # -- the request path -------------------------------------------------------------------------------------
    async def ask(self, image: bytes, questions: list[str]) -> Outcome:
        """Raises ImageError (bad upload), Overloaded, NotReady, TimeoutError, or ItemFailed."""
        arrived = time.monotonic()
        if not self.ready():
            raise NotReady("the model is not loaded")
        if self.queue.full():
            self.metrics.dropped.labels("overloaded").inc()
            raise Overloaded("the queue is full")
        loop = asyncio.get_running_loop()
        self._incoming += 1
        try:
            prepared = await loop.run_in_executor(self._prep_pool, self._prepare, image, questions)
        finally:
            self._incoming -= 1
        self.metrics.preprocess.observe(time.monotonic() - arrived)
        deadline = arrived + self.settings.timeout_s
        item = WorkItem(prepared.key, prepared.pixels, prepared.input_ids, prepared.attention_mask,
                        loop.create_future(), deadline)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.dropped.labels("overloaded").inc()
            raise Overloaded("the queue is full") from None
        self.metrics.queue_depth.set(self.collector.pending())
        answers = await asyncio.wait_for(item.future, max(0.0, deadline - time.monotonic()))
        return Outcome(answers, round((item.started_at - item.enqueued_at) * 1000, 2),
                       round(item.compute_s * 1000, 2), item.batch_size)

    def _prepare(self, image: bytes, questions: list[str]) -> Prepared:
        assert self.loaded is not None and self._upload is not None
        with self.metrics.stage("decode"):
            decoded = self._upload.decode(image)
        with self.metrics.stage("preprocess"):
            key = hashlib.sha256(image).hexdigest()
            pixels = self._upload.pixels(decoded)
            enc = self.loaded.tokenizer.encode(questions)
        return Prepared(key, pixels, enc.input_ids, enc.attention_mask)
