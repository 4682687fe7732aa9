"""A real `vqa-async serve` for the client and batch-job tests, with keys on and its access log in a file, and
a direct POST to compare the client's answers with."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import requests

from vqa_async.cluster.supervisor import free_port

API_KEY = "client-test-key-0123456789"


@dataclass
class Serve:
    url: str
    access_log: Path
    proc: subprocess.Popen[bytes]

    def log_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.access_log.read_bytes().splitlines() if line.strip()]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s")


def serve(demo_dir: Path, tmp: Path, *extra: str) -> Iterator[Serve]:
    keys = tmp / "keys"
    keys.write_text(f"tester:{API_KEY}\n")
    log = tmp / "access.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vqa_async.cli", "--log-level", "WARNING", "serve", "--model",
                             str(demo_dir), "--port", str(port), "--api-keys", str(keys), "--access-log", str(log),
                             *extra])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield Serve(url, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def direct_post(url: str, image: bytes, questions: list[str], content_type: str = "image/png") -> dict[str, Any]:
    """POST /v1/vqa by hand: the answer the client's must equal."""
    r = requests.post(url + "/v1/vqa", files=[("image", ("a", image, content_type)),
                                              *[("question", (None, q)) for q in questions]],
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body
