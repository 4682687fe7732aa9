"""A real `vqa-async serve` for the client and batch-job tests, with keys on and its access log in a file, and
a direct POST to compare the client's answers with."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cluster_support import stop_process

API_KEY = "client-test-key-0123456789"


@dataclass
class Serve:
    url: str
    access_log: Path
    proc: subprocess.Popen[bytes]

    def log_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.access_log.read_bytes().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        stop_process(proc)


def direct_post(url: str, image: bytes, questions: list[str], content_type: str = "image/png") -> dict[str, Any]:
    """POST /v1/vqa by hand (a multipart body built here): the answer the client's must equal."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n'
             f"Content-Type: {content_type}\r\n\r\n".encode() + image + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\n{q}\r\n'.encode()
              for q in questions]
    req = urllib.request.Request(url + "/v1/vqa", data=b"".join(parts) + f"--{boundary}--\r\n".encode(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body: dict[str, Any] = orjson.loads(r.read())
    return body
