"""What the bench sends: named workloads over a set of images, every upload's bytes new to the server.

Workloads (`--workload`):
- `distinct` (the default; every target is judged on it): one question per request, every upload new.
- `follow-up`: a person asks `k` questions about one new image, one request after another (by the `image_id` the
  server's first answer gives, where it gives one; else the same bytes again): the embedding cache's case.
- `multi`: `k` questions in one request about one new image.
- `many-people`: `distinct`, but each closed-loop client connects from its own address (127.0.0.2, 127.0.0.3,
  ...), so the server sees many clients, as in production; through the cluster HAProxy passes each address on
  in X-Forwarded-For.

Cache-proof: every upload gets a unique trailer after the image's end marker (PNG's IEND chunk, JPEG's EOI):
the pixels are the same, the bytes (and so their sha256, the embedding cache's and per-batch dedup's key) are
new. The trailer holds this run's id and a counter, so no two requests of a run, whatever row, repeat or system
they belong to, send the same bytes.
"""

from __future__ import annotations

import io
import ipaddress
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.lib.forms import Form, Job, easy_vqa_requests, multipart

WORKLOADS = ("distinct", "follow-up", "multi", "many-people")
QUESTIONS = ["what is in the picture?", "what color is it?", "is there a person?", "how many are there?"]
PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class Stamper:
    """Appends a trailer no other request of this run carries: the run's random id and a counter."""

    def __init__(self) -> None:
        self.run_id = os.urandom(6).hex()
        self._count = itertools.count()

    def __call__(self, image: bytes) -> bytes:
        return image + f"\0vqa-bench {self.run_id} {next(self._count)}\0".encode()


STAMP = Stamper()  # one per process: the bench runs in one process, so a run never repeats a trailer


def ends_with_marker(image: bytes) -> bool:
    """The file ends at its image's end marker, so a trailer after it changes no pixel."""
    return image.endswith(PNG_END) or image.rstrip(b"\0").endswith(JPEG_END)


def content_type(image: bytes) -> tuple[str, str]:
    return ("photo.jpg", "image/jpeg") if image[:2] == b"\xff\xd8" else ("image.png", "image/png")


@dataclass(frozen=True)
class Picture:
    data: bytes
    question: str


def source_images(images: str | None) -> list[Picture]:
    """The images the workload cycles over, each with a question: easy-VQA's test split (default), `photos`
    (bench.lib.photos: the phone-like set), or a folder."""
    if images == "photos":
        from bench.lib.photos import build

        blobs = [p.path.read_bytes() for p in build()]
        return [Picture(b, QUESTIONS[(i // len(blobs)) % len(QUESTIONS)]) for i, b in
                enumerate(blobs * len(QUESTIONS))]
    if images:
        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no images in {images}")
        return [Picture(f.read_bytes(), QUESTIONS[i % len(QUESTIONS)]) for i, f in enumerate(files)]
    pairs = easy_vqa_requests(len(_easy_vqa_paths()))
    return [Picture(img, q) for img, q in pairs]


def _easy_vqa_paths() -> list[str]:
    from vqa_async.model.evaluate import easy_vqa_test

    return list(easy_vqa_test()[2])


def mean_megapixels(pictures: list[Picture]) -> float:
    """Mean size of the images, in megapixels (read from the headers: nothing is decoded)."""
    from PIL import Image

    sizes = []
    for p in pictures:
        with Image.open(io.BytesIO(p.data)) as im:
            sizes.append(im.size[0] * im.size[1] / 1e6)
    return round(sum(sizes) / max(1, len(sizes)), 3)


def person_address(i: int) -> str:
    """The i-th person's loopback address: 127.0.0.2, 127.0.0.3, ... (all of 127.0.0.0/8 is this machine's)."""
    return str(ipaddress.IPv4Address("127.0.0.2") + i)


@dataclass
class Workload:
    name: str = "distinct"
    images: str | None = None  # None: easy-VQA; "photos"; a folder
    k: int = 4  # questions per image for follow-up and multi
    pictures: list[Picture] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"unknown workload {self.name!r}: expected one of {', '.join(WORKLOADS)}")
        if not self.pictures:
            self.pictures = source_images(self.images)
        self._next = itertools.count()

    def _picture(self) -> Picture:
        return self.pictures[next(self._next) % len(self.pictures)]

    def _questions(self, first: str) -> list[str]:
        return [first] + [q for q in QUESTIONS if q != first][: self.k - 1]

    def job(self) -> Job:
        """The next job: every call stamps new bytes."""
        p = self._picture()
        data = STAMP(p.data)
        name, ctype = content_type(data)
        if self.name == "multi":
            return (multipart(data, self._questions(p.question), name, ctype),)
        if self.name == "follow-up":
            return tuple(multipart(data, [q], name, ctype) for q in self._questions(p.question))
        return (multipart(data, [p.question], name, ctype),)

    def jobs(self, requests: int) -> list[Job]:
        """About `requests` requests (follow-up: requests // k people of k requests each), encoded now."""
        n = max(1, requests // self.k) if self.name == "follow-up" else requests
        return [self.job() for _ in range(n)]

    def endless(self) -> Iterator[Job]:
        """Jobs for a run that lasts a time, each stamped and encoded as a client takes it."""
        while True:
            yield self.job()

    def sources(self, concurrency: int) -> list[str] | None:
        return [person_address(i) for i in range(concurrency)] if self.name == "many-people" else None

    def answers_per_request(self) -> int:
        return self.k if self.name == "multi" else 1


def forms_of(jobs: list[Job]) -> list[Form]:
    return [f for job in jobs for f in job]
