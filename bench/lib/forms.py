"""What the load generator sends, built before it sends it: easy-VQA's (image, question) pairs, and each request
as a multipart/form-data body (`Form`; a `Job` is what one client sends in a row). Beneath both loadgen.py and
workloads.py, so that neither imports the other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class Form:
    """One request, encoded: a multipart/form-data body and its Content-Type, and the questions it asks (a
    follow-up by image_id is built from them)."""

    body: bytes
    content_type: str
    questions: tuple[str, ...] = ()


Job = tuple[Form, ...]  # what one client sends in a row

BOUNDARY = "vqa-bench-boundary-7d1f0c"


def multipart(image: bytes | None, questions: Sequence[str], filename: str = "image.png",
              content_type: str = "image/png", fields: Sequence[tuple[str, str]] = ()) -> Form:
    """A multipart/form-data body as browsers and aiohttp's FormData write it: the `image` part (if any), then one
    `question` part per question, then any other text fields. Built by hand, in microseconds, so that a run
    that lasts a time can stamp and encode each request as it sends it."""
    parts: list[bytes] = []
    b = BOUNDARY.encode()
    if image is not None:
        parts += [b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="' + filename.encode()
                  + b'"\r\nContent-Type: ' + content_type.encode() + b"\r\n\r\n", image, b"\r\n"]
    for name, value in [("question", q) for q in questions] + list(fields):
        parts += [b"--" + b + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n',
                  value.encode(), b"\r\n"]
    parts.append(b"--" + b + b"--\r\n")
    return Form(b"".join(parts), f"multipart/form-data; boundary={BOUNDARY}", tuple(questions))


def encode_forms(pairs: list[tuple[bytes, str]]) -> list[Form]:
    """Each (image, question) as a multipart/form-data body, encoded once, before the clock starts."""
    return [multipart(image, [question]) for image, question in pairs]
