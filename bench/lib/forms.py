"""What the load generator sends, built before it sends it: easy-VQA's (image, question) pairs, and each request
as a multipart/form-data body (`Form`; a `Job` is what one client sends in a row). Beneath both loadgen.py and
workloads.py, so that neither imports the other."""

from __future__ import annotations

from pathlib import Path

# The one multipart builder (the tests send with it too); re-exported for the scenarios that take it from here.
from vqa_async.testing.http import BOUNDARY as BOUNDARY
from vqa_async.testing.http import Form as Form
from vqa_async.testing.http import multipart as multipart


def easy_vqa_requests(n: int) -> list[tuple[bytes, str]]:
    """n (image bytes, question) pairs from easy-VQA's test split, cycling; one bytes object per image. The same
    bytes come back after 1,000-odd requests: a comparison stamps them (bench.lib.workloads)."""
    from vqa_async.model.evaluate import easy_vqa_test

    questions, _, paths = easy_vqa_test()
    images: dict[str, bytes] = {}
    out = []
    for i in range(n):
        path = paths[i % len(paths)]
        if path not in images:
            images[path] = Path(path).read_bytes()
        out.append((images[path], questions[i % len(paths)]))
    return out


Job = tuple[Form, ...]  # what one client sends in a row


def encode_forms(pairs: list[tuple[bytes, str]]) -> list[Form]:
    """Each (image, question) as a multipart/form-data body, encoded once, before the clock starts."""
    return [multipart(image, [question]) for image, question in pairs]
