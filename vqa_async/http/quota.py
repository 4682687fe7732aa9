"""`--max-inflight-per-client`: how many requests of one client a worker answers at once (429 above).

Counted from when the upload has been read until the answer, per worker process; behind the cluster each worker
counts on its own, so the cluster-wide bound is workers x N.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vqa_async.http.errors import refuse


class InflightLimit:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.inflight: dict[str, int] = {}

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        n = self.inflight.get(client, 0)
        if self.limit and n >= self.limit:
            raise refuse("too_many_requests", f"{n} of your requests are being answered already; at most "
                         f"{self.limit} at once (--max-inflight-per-client)", {"Retry-After": "1"})
        self.inflight[client] = n + 1
        try:
            yield
        finally:
            left = self.inflight[client] - 1
            if left:
                self.inflight[client] = left
            else:
                del self.inflight[client]  # bounded by the clients with work in flight
