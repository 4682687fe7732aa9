"""The one error the client raises, and what it answers with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class VqaError(Exception):
    """A request that got no answer. `status` is the HTTP status (0: no HTTP answer at all) and `code` the
    server's stable error code (README, "Errors"), or one of the client's own: `connection_failed` (no
    connection after every retry), `client_timeout` (no answer within the client's timeout), `image_unreadable`
    (the image file could not be read), `invalid_response` (the server's answer was not the API's JSON)."""

    def __init__(self, status: int, code: str, message: str, *, request_id: str | None = None,
                 retry_after_s: float | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.body = body  # the server's JSON error body, when there was one

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status else ""
        return f"{where}{self.code}: {self.message}"


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
