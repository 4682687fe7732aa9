"""The bench's one metrics reader: what the servers counted during a row, from their `/metrics`.

`counted(urls)` sums every worker's own page; the difference of two readings is what happened between them:
cache hits and misses, per-batch dedups (`vqa_image_dedup_total`), model calls and their sizes, preemptions,
requests dropped at their deadline, and the CPU of the upload path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vqa_async.testing.http import scrape  # the one metrics reader

# name in the row -> (metric on the page, label filter: a sample counts if its name is this and every pair holds)
SERIES: dict[str, tuple[str, dict[str, str]]] = {
    "cache_hits": ("vqa_image_cache_hits_total", {}),
    "cache_misses": ("vqa_image_cache_misses_total", {}),
    "dedups": ("vqa_image_dedup_total", {}),
    "questions": ("vqa_batch_size_sum", {}),
    "model_calls": ("vqa_batch_size_count", {}),
    "images": ("vqa_batch_images_sum", {}),
    "failed_model_calls": ("vqa_batch_failures_total", {}),
    "preemptions": ("vqa_preemptions_total", {}),
    "deadline_drops": ("vqa_dropped_requests_total", {"reason": "deadline"}),
    "decode_cpu_s": ("vqa_stage_cpu_seconds_total", {"stage": "decode"}),
    "preprocess_cpu_s": ("vqa_stage_cpu_seconds_total", {"stage": "preprocess"}),
}


@dataclass
class Counted:
    cache_hits: float = 0.0
    cache_misses: float = 0.0
    dedups: float = 0.0
    questions: float = 0.0
    model_calls: float = 0.0
    images: float = 0.0
    failed_model_calls: float = 0.0
    preemptions: float = 0.0
    deadline_drops: float = 0.0
    decode_cpu_s: float = 0.0
    preprocess_cpu_s: float = 0.0

    def __sub__(self, other: Counted) -> Counted:
        return Counted(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def row(self, answers: int) -> dict[str, float | int | None]:
        """The row's columns: counts as integers, the mean batch, the upload path's CPU per answer."""
        return {"cache_hits": int(self.cache_hits), "cache_misses": int(self.cache_misses),
                "dedups": int(self.dedups), "model_calls": int(self.model_calls),
                "mean_batch_size": round(self.questions / self.model_calls, 2) if self.model_calls else 0.0,
                "failed_model_calls": int(self.failed_model_calls), "preemptions": int(self.preemptions),
                "deadline_drops": int(self.deadline_drops),
                "cpu_ms_per_image": round(1000 * (self.decode_cpu_s + self.preprocess_cpu_s) / answers, 2)
                if answers else None}


def _matches(key: str, name: str, labels: dict[str, str]) -> bool:
    bare, _, rest = key.partition("{")
    return bare == name and all(f'{k}="{v}"' in rest for k, v in labels.items())


def counted(urls: list[str]) -> Counted:
    """The counters summed over `urls` (each worker's own /metrics)."""
    out = Counted()
    for url in urls:
        page = scrape(url)
        for attr, (name, labels) in SERIES.items():
            setattr(out, attr, getattr(out, attr) + sum(v for k, v in page.items() if _matches(k, name, labels)))
    return out
