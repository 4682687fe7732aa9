"""What tests and the bench send and read over HTTP: the one multipart/form-data builder, and the one reader of a
Prometheus /metrics page."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

BOUNDARY = "vqa-bench-boundary-7d1f0c"


@dataclass(frozen=True)
class Form:
    """One request, encoded: a multipart/form-data body and its Content-Type, and the questions it asks (a
    follow-up by image_id is built from them)."""

    body: bytes
    content_type: str
    questions: tuple[str, ...] = ()


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


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text page as {"name{label=...}": value} (labels sorted); unlabelled series under their bare
    name."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def scrape(url: str, headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | None = None,
           timeout: float = 5) -> dict[str, float]:
    """GET a /metrics page and parse it (`parse_metrics`)."""
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout, context=ssl_context) as r:
        return parse_metrics(r.read().decode())


def metric(page: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    def match(key: str) -> bool:
        bare, _, rest = key.partition("{")
        return bare == name and all(f'{k}="{v}"' in rest for k, v in labels.items())

    return sum(v for k, v in page.items() if match(k))
