"""Prometheus metrics of one server process, in a registry of its own (tests build many apps in one process).

Under `vqa-async cluster` the workers also run in prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set by the supervisor: vqa_async/cluster/metrics_dir.py): `/metrics` is still this process's own, and
`/metrics/cluster` is the sum over every worker's files, which the front's `/metrics` shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own name: read when it is imported
SUM_ROUTE = "/metrics/cluster"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def summed(path: str) -> bytes:
    """The Prometheus page of every process writing to `path`: counters and histograms summed, gauges by their
    multiprocess_mode."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry)

# Where the time of a request goes, for the bench's profile: per request `decode` (image bytes to an upright RGB
# image) and `preprocess` (resize, tokenize, hash); per model call `vision` (normalizing the batch's pixels and the
# vision encoder) and `decoder` (text encoder, fusion and answer generation). HTTP is the process's CPU time minus
# these.
STAGES = ("decode", "preprocess", "vision", "decoder")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vqa_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("vqa_request_latency_seconds", "time from arrival to response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        # multiprocess_mode: how the cluster's sum shows a gauge (live workers only); ignored in a single process.
        self.queue_depth = Gauge("vqa_queue_depth", "requests waiting for the model", registry=r,
                                 multiprocess_mode="livesum")
        self.batch_size = Histogram("vqa_batch_size", "questions per model call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_images = Histogram("vqa_batch_images", "distinct images per model call", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.queue_wait = Histogram("vqa_queue_wait_seconds", "time a request waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("vqa_compute_seconds", "time of one model call", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.preprocess = Histogram("vqa_preprocess_seconds", "image decoding and resizing per request",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("vqa_image_cache_hits", "image embeddings reused", registry=r)
        self.cache_misses = Counter("vqa_image_cache_misses", "images run through the vision encoder", registry=r)
        self.image_dedups = Counter("vqa_image_dedup", "requests in a model call whose upload another request of "
                                    "the call had sent too (one vision pass for both)", registry=r)
        self.dropped = Counter("vqa_dropped_requests", "requests skipped before the model", ["reason"], registry=r)
        self.batch_failures = Counter("vqa_batch_failures", "model calls that raised", ["kind"], registry=r)
        self.preemptions = Counter("vqa_preemptions", "batches answered inside a running batch, at a stage "
                                   "boundary (light clients' requests)", registry=r)
        self.batch_cap = Gauge("vqa_batch_cap", "current questions-per-call cap (lowered after out-of-memory)",
                               registry=r, multiprocess_mode="livemin")  # the sum: the lowest, any OOM shows
        self.stage_seconds = Counter("vqa_stage_seconds", "wall time spent in each stage", ["stage"], registry=r)
        self.stage_cpu = Counter("vqa_stage_cpu_seconds", "CPU time of the thread that ran each stage "
                                 "(the whole stage when torch runs single-threaded)", ["stage"], registry=r)
        # Only with --api-keys: the label is a key's name, so its values are bounded by the keys file (addresses
        # would not be).
        self.client_requests = Counter("vqa_client_requests", "API requests by API key name and status",
                                       ["client", "status"], registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory
        for reason in ("client_left", "deadline"):
            self.dropped.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
            self.stage_cpu.labels(stage)

    def watch_waiting(self, count: Callable[[], int]) -> None:
        """`vqa_requests_waiting`, read from `count()` at each scrape: the signal to autoscale workers on
        (deploy/kubernetes/autoscaling.yaml, docs/container.md)."""
        self.registry.register(_Waiting(count))

    @contextmanager
    def stage(self, name: str, excluded: Callable[[], tuple[float, float]] | None = None) -> Iterator[None]:
        """Counts the wall and thread CPU time of the block under `vqa_stage_*_seconds{stage=name}`, less what
        `excluded()` (running totals of wall and CPU seconds) grew by meanwhile: other work run inside it."""
        wall, cpu = time.perf_counter(), time.thread_time()
        ex_wall, ex_cpu = excluded() if excluded else (0.0, 0.0)
        try:
            yield
        finally:
            end_wall, end_cpu = excluded() if excluded else (0.0, 0.0)
            self.stage_seconds.labels(name).inc(max(0.0, time.perf_counter() - wall - (end_wall - ex_wall)))
            self.stage_cpu.labels(name).inc(max(0.0, time.thread_time() - cpu - (end_cpu - ex_cpu)))


class _Waiting(Collector):
    """Requests a worker has accepted that no model call has started yet (uploads being decoded, the queue, the
    collector's lines), counted when scraped, so that a scrape between batches sees the backlog as it is (the
    `vqa_queue_depth` gauge is set when requests arrive and batches start). The worker's own `/metrics` only: an
    autoscaler reads it per pod; under `vqa-async cluster` the front's sum keeps `vqa_queue_depth`."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("vqa_requests_waiting", "requests accepted and not yet in a model call "
                                "(decoding, queued); per worker: the autoscaling signal", value=self.count())
