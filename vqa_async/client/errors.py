"""The one error the client raises (what it answers with is in answers.py)."""

from __future__ import annotations

from typing import Any

# The answer types lived here; their old import path stays.
from vqa_async.client.answers import Answer as Answer
from vqa_async.client.answers import Response as Response


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
