"""What the client answers with: `Answer` (a VQA answer and its timings) and `Response` (an HTTP answer as it came)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Answer:
    """The answer(s) to one request, the image's id for follow-up questions, and where the time went."""

    answers: tuple[str, ...]
    image_id: str | None  # the server's name for the image (None: the server does not name images)
    model: str | None
    queue_ms: float | None  # the server's own timings
    compute_ms: float | None
    batch_size: int | None
    latency_ms: float  # as the caller saw it: preparing the image, every attempt and back-off
    attempts: int  # HTTP requests sent (retries and a re-upload after `image_not_cached` included)
    upload_bytes: int  # image bytes sent (0 when the image went by its id or URL)
    request_id: str | None
    body: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)  # the server's JSON as it came

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass(frozen=True)
class Response:
    """An HTTP answer as it came (for routes whose JSON the caller reads itself, e.g. /v1/chat/completions)."""

    status: int
    request_id: str | None
    body: Any  # parsed JSON, or the text when it was not JSON
    attempts: int
    headers: dict[str, str] = field(repr=False, compare=False, default_factory=dict)
