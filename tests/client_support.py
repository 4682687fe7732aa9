"""A real `vqa-async serve` for the client and batch-job tests, with keys on and its access log in a file, and
a direct POST to compare the client's answers with. Started by the one launcher (vqa_async/testing/launch.py)."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from vqa_async.testing.http import multipart
from vqa_async.testing.launch import Launched, start_serve
from vqa_async.testing.launch import wait_ready as wait_ready  # noqa: PLC0414 - kept for the tests that import it

API_KEY = "client-test-key-0123456789"


@dataclass
class Serve:
    url: str
    access_log: Path
    proc: subprocess.Popen[bytes]
    launched: Launched | None = None

    def log_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.access_log.read_bytes().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(demo_dir: Path, tmp: Path, *extra: str) -> Iterator[Serve]:
    srv = start_serve(demo_dir, *extra, keys={"tester": API_KEY}, access_log=tmp / "access.log", home=tmp,
                      log_level="WARNING")
    try:
        yield Serve(srv.url, tmp / "access.log", srv.proc, srv)
    finally:
        srv.stop(timeout=30)


def direct_post(url: str, image: bytes, questions: list[str], content_type: str = "image/png") -> dict[str, Any]:
    """POST /v1/vqa by hand (the one multipart builder): the answer the client's must equal."""
    form = multipart(image, questions, filename="a", content_type=content_type)
    req = urllib.request.Request(url + "/v1/vqa", data=form.body, headers={
        "Content-Type": form.content_type, "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body: dict[str, Any] = orjson.loads(r.read())
    return body
