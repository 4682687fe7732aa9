"""A closed-loop load generator: `concurrency` clients send `requests` questions in all, each as soon as its
previous answer came back. Used by the tests, the issue notes' load checks, and the bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import uvloop


@dataclass
class Result:
    status: int  # 0: no HTTP response (connection error)
    latency_s: float
    answer: str | None = None
    served_by: str | None = None
    batch_size: int | None = None
    error: str | None = None


def easy_vqa_requests(n: int) -> list[tuple[bytes, str]]:
    """n (image bytes, question) pairs from easy-VQA's test split, cycling; one bytes object per image."""
    from vqa_async.tools.evaluate import easy_vqa_test

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
    """One request, encoded: a multipart/form-data body and its Content-Type."""

    body: bytes
    content_type: str


async def _encode(pairs: list[tuple[bytes, str]]) -> list[Form]:
    out = []
    for image, question in pairs:
        form = aiohttp.FormData()
        form.add_field("image", image, filename="image.png", content_type="image/png")
        form.add_field("question", question)
        payload = form()
        out.append(Form(await payload.as_bytes(), payload.content_type))
    return out


def encode_forms(pairs: list[tuple[bytes, str]]) -> list[Form]:
    """Each (image, question) as a multipart/form-data body, encoded once. Call it before the clock starts: the
    load generator should spend its CPU on sending, and encoding costs about 24 µs a request."""
    return uvloop.run(_encode(pairs))


def load(url: str, requests: list[Form] | list[tuple[bytes, str]], concurrency: int, **kwargs: Any) -> list[Result]:
    """`run_load` on uvloop (the loop the servers run on too): less of the shared CPU goes to the client."""
    return uvloop.run(run_load(url, requests, concurrency, **kwargs))


async def run_load(url: str, requests: list[Form] | list[tuple[bytes, str]], concurrency: int,
                   timeout_s: float = 60.0, ssl_context: ssl.SSLContext | None = None) -> list[Result]:
    """Sends `requests` (encoded Forms, or (image, question) pairs, encoded here) from `concurrency` clients."""
    if requests and not isinstance(requests[0], Form):
        forms = await _encode(cast(list[tuple[bytes, str]], requests))
    else:
        forms = cast(list[Form], requests)
    results: list[Result] = []
    todo = iter(forms)  # the clients share it: each takes the next request when its last one is answered
    # ssl_context: an https URL's CA (a self-signed front); otherwise aiohttp's default verification.
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context if ssl_context is not None else True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:

        async def client() -> None:
            for form in todo:
                t0 = time.monotonic()
                try:
                    async with s.post(url, data=form.body, headers={"Content-Type": form.content_type}) as r:
                        raw = await r.read()
                        res = Result(r.status, time.monotonic() - t0, served_by=r.headers.get("X-Served-By"))
                        if r.status == 200:
                            reply = orjson.loads(raw)
                            res.answer, res.batch_size = reply.get("answer"), reply.get("batch_size")
                        else:
                            res.error = raw[:200].decode(errors="replace")
                except (TimeoutError, aiohttp.ClientError, ValueError) as e:  # orjson's error is a ValueError
                    res = Result(0, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
                results.append(res)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def percentile(sorted_ms: list[float], p: float) -> float:
    """The p-th percentile (nearest rank below) of an ascending list, rounded to 0.1."""
    return round(sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))], 1)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    """Polls `url`/readyz until it answers 200; raises if `proc` exits first or `timeout` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s")


def summarize(results: list[Result], wall_s: float) -> dict[str, float | int]:
    ok = [r for r in results if r.status == 200]
    lat = sorted(r.latency_s * 1000 for r in ok) or [0.0]

    def pct(p: float) -> float:
        return percentile(lat, p)

    sizes = [r.batch_size for r in ok if r.batch_size]
    return {"requests": len(results), "failures": len(results) - len(ok), "answers_per_s": round(len(ok) / wall_s, 2),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_batch_size_seen": round(statistics.mean(sizes), 2) if sizes else 0.0,
            "max_batch_size_seen": max(sizes) if sizes else 0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1/vqa")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    forms = encode_forms(easy_vqa_requests(args.requests))
    t0 = time.monotonic()
    results = load(args.url, forms, args.concurrency)
    print(json.dumps({"concurrency": args.concurrency, **summarize(results, time.monotonic() - t0)}))


if __name__ == "__main__":
    main()
