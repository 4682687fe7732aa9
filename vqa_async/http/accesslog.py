"""The access log: one JSON line per request (`--access-log -|PATH|off`; `-` is stdout).

Stdout holds nothing but these lines (the process's own log goes to stderr), so `vqa-async serve 2>/dev/null |
jq` reads them. A file is opened for appending and reopened on SIGHUP, after logrotate has moved it.
Lines carry the client's key name, never a key.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import IO

import orjson
from aiohttp import web

from vqa_async.http.context import CLIENT, ERROR_CODE, OUTCOME, QUESTIONS, REQUEST_ID, TRACE_ID, TRACEPARENT

log = logging.getLogger(__name__)


# Liveness and readiness, under our names and KServe v2's.
PROBES = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


class AccessLog:
    def __init__(self, target: str, worker: str | None = None) -> None:
        self.target = target
        self.worker = worker or str(os.getpid())
        self._file: IO[bytes] | None = None
        self.reopen()

    @property
    def enabled(self) -> bool:
        return self.target != "off"

    def reopen(self) -> None:
        if not self.enabled or self.target == "-":
            return
        old, self._file = self._file, open(self.target, "ab")  # noqa: SIM115 - held until close()
        if old is not None:
            old.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, request: web.Request, status: int, latency_s: float) -> None:
        # A passing probe is not a request anyone asks about: HAProxy checks each worker every 0.5 s, which would
        # be most of the log. A failing one is logged.
        if not self.enabled or (request.path in PROBES and status < 400):
            return
        self.write(self.record(request, status, latency_s))

    def record(self, request: web.Request, status: int, latency_s: float) -> dict[str, object]:
        route = request.match_info.route.resource
        client = request.get(CLIENT)
        out = request.get(OUTCOME)
        rec: dict[str, object] = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "request_id": request.get(REQUEST_ID),
            "client": client.name if client is not None else None,
            "method": request.method,
            "route": route.canonical if route is not None else "unmatched",
            "status": status,
            "latency_ms": round(latency_s * 1000, 2),
            "queue_ms": out.queue_ms if out else None,
            "preprocess_ms": out.preprocess_ms if out else None,
            "compute_ms": out.compute_ms if out else None,
            "batch_size": out.batch_size if out else None,
            "questions": request.get(QUESTIONS),
            "upload_bytes": request.content_length or 0,
            "worker": self.worker,
        }
        if code := request.get(ERROR_CODE):
            rec["error"] = code
        if tp := request.get(TRACEPARENT):
            rec["traceparent"] = tp
        if trace_id := request.get(TRACE_ID):  # the same as in HAProxy's log line and the spans
            rec["trace_id"] = trace_id
        return rec

    def write(self, rec: dict[str, object]) -> None:
        line = orjson.dumps(rec) + b"\n"
        try:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
            else:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
        except (OSError, ValueError) as e:  # a full disk or closed pipe must not fail the request
            log.warning("access log write failed: %s", e)
