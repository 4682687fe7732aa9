"""Fairness between clients on one `serve`: a bulk client does not starve an interactive one.

    python bench/fairness.py [--url URL] [--seconds S]

One "big" client at concurrency 64 sends 4-question requests; one "small" client at concurrency 1 sends single
questions. Measured: the small client's P95 alone and shared, the big client's answers/s alone and shared, and the
small client's P95 shared under `--scheduling fifo` (today's single queue). Targets: small P95 shared <= 2x alone;
big answers/s shared >= 90 % of alone.

Without --url it starts its own `serve` (fair, then fifo) with two API keys, and the clients are told apart by
X-API-Key. With --url, pass --key-big/--key-small for a server with keys, or neither: the clients then send
X-Forwarded-For (a server trusts that from loopback); --fifo-url measures the FIFO figure on a second server
(else it is null). The last line is JSON. `--serve-args "--torch-threads 1 --preempt-share S"` sets how much of
the model's time the small client's requests may take by preemption (0: none; the default is serve's, 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from vqa_async.cluster.supervisor import free_port
from vqa_async.tools.loadgen import Form, easy_vqa_requests, percentile, wait_ready

BIG_QUESTIONS = 4


async def _forms(n: int, questions: int) -> list[Form]:
    pairs = easy_vqa_requests(n * questions)
    out = []
    for i in range(n):
        form = aiohttp.FormData()
        form.add_field("image", pairs[i * questions][0], filename="image.png", content_type="image/png")
        for _, q in pairs[i * questions:(i + 1) * questions]:
            form.add_field("question", q)
        payload = form()
        out.append(Form(await payload.as_bytes(), payload.content_type))
    return out


class Client:
    def __init__(self, name: str, forms: list[Form], concurrency: int, headers: dict[str, str]) -> None:
        self.name, self.forms, self.concurrency, self.headers = name, forms, concurrency, headers
        self.latencies_ms: list[float] = []
        self.answers = 0
        self.errors: dict[int, int] = {}

    async def run(self, session: aiohttp.ClientSession, url: str, start: float, end: float) -> None:
        counter = iter(range(10**9))

        async def one() -> None:
            while time.monotonic() < end:
                form = self.forms[next(counter) % len(self.forms)]
                t0 = time.monotonic()
                async with session.post(url + "/v1/vqa", data=form.body, headers={
                        **self.headers, "Content-Type": form.content_type}) as r:
                    body = await r.read()
                done = time.monotonic()
                if t0 < start or done > end:  # warm-up, or past the window: not counted
                    continue
                if r.status != 200:
                    self.errors[r.status] = self.errors.get(r.status, 0) + 1
                    continue
                self.latencies_ms.append((done - t0) * 1000)
                reply = json.loads(body)
                self.answers += len(reply["answers"]) if "answers" in reply else 1

        tasks = [asyncio.create_task(one()) for _ in range(self.concurrency)]
        # What is still in flight at the end is not counted: cancel it rather than wait for the queue to drain.
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.monotonic()) + 0.2)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def p95(self) -> float | None:
        return percentile(sorted(self.latencies_ms), 95) if self.latencies_ms else None


async def measure(url: str, clients: list[Client], seconds: float, warmup: float = 1.0) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        start = time.monotonic() + warmup
        await asyncio.gather(*(c.run(s, url, start, start + seconds) for c in clients))


def headers_for(name: str, key: str | None, index: int) -> dict[str, str]:
    if key:
        return {"X-API-Key": key}
    return {"X-Forwarded-For": f"198.51.100.{index}"}  # told apart by address (trusted from loopback)


def scenario(url: str, seconds: float, keys: dict[str, str | None], fifo_url: str | None,
             forms: dict[str, list[Form]], big_concurrency: int) -> dict[str, Any]:
    def big() -> Client:
        return Client("big", forms["big"], big_concurrency, headers_for("big", keys["big"], 1))

    def small() -> Client:
        return Client("small", forms["small"], 1, headers_for("small", keys["small"], 2))

    async def warm(target: str) -> None:  # the first model calls of a process are slow: keep them out
        async with aiohttp.ClientSession() as session:
            for form in forms["small"][:5] + forms["big"][:3]:
                async with session.post(target + "/v1/vqa", data=form.body, headers={
                        **headers_for("warm", keys["small"], 3), "Content-Type": form.content_type}) as r:
                    await r.read()

    for target in filter(None, (url, fifo_url)):
        asyncio.run(warm(target))
    out: dict[str, Any] = {}
    s_alone = small()
    asyncio.run(measure(url, [s_alone], seconds))
    b_alone = big()
    asyncio.run(measure(url, [b_alone], seconds))
    s_shared, b_shared = small(), big()
    asyncio.run(measure(url, [s_shared, b_shared], seconds))
    for label, c in (("small alone", s_alone), ("big alone", b_alone), ("small shared", s_shared),
                     ("big shared", b_shared)):
        print(f"{label:13s} requests {len(c.latencies_ms):5d}  answers/s {c.answers / seconds:7.1f}  "
              f"p95 {c.p95()} ms  errors {c.errors}", file=sys.stderr)
    out.update(small_p95_alone_ms=s_alone.p95(), small_p95_shared_ms=s_shared.p95(),
               big_answers_per_s_alone=round(b_alone.answers / seconds, 1),
               big_answers_per_s_shared=round(b_shared.answers / seconds, 1), fifo_small_p95_shared_ms=None)
    if fifo_url:
        f_small, f_big = small(), big()
        asyncio.run(measure(fifo_url, [f_small, f_big], seconds))
        print(f"fifo shared: small p95 {f_small.p95()} ms, big answers/s {f_big.answers / seconds:.1f}",
              file=sys.stderr)
        out["fifo_small_p95_shared_ms"] = f_small.p95()
    return out


def start_serve(port: int, scheduling: str, keys_file: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "vqa_async.cli", "serve", "--port", str(port), "--scheduling", scheduling,
           "--api-keys", str(keys_file), "--access-log", "off", *extra]
    return subprocess.Popen(cmd, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running serve (default: start one, fair then fifo)")
    p.add_argument("--fifo-url", default=None, help="with --url: a serve with --scheduling fifo")
    p.add_argument("--key-big", default=None)
    p.add_argument("--key-small", default=None)
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time of each phase")
    p.add_argument("--big-concurrency", type=int, default=64, help="the big client's concurrency (tests: less)")
    # One torch thread: on a small shared CPU box torch's default threads spin against each other (a demo
    # answer took 1 s instead of 60 ms at a load average of 8 on 2 cores).
    p.add_argument("--serve-args", default="--torch-threads 1",
                   help="options for the serve this starts (default: '--torch-threads 1'), e.g. '--device cuda'")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    forms = {"big": asyncio.run(_forms(256, BIG_QUESTIONS)), "small": asyncio.run(_forms(64, 1))}
    print(f"encoded the requests in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    if args.url:
        result = scenario(args.url.rstrip("/"), args.seconds, {"big": args.key_big, "small": args.key_small},
                          args.fifo_url, forms, args.big_concurrency)
    else:
        keys = {"big": "bench-big-" + os.urandom(8).hex(), "small": "bench-small-" + os.urandom(8).hex()}
        with tempfile.TemporaryDirectory() as tmp:
            keys_file = Path(tmp) / "keys"
            keys_file.write_text("".join(f"{name}:{key}\n" for name, key in keys.items()))
            urls, procs = {}, []
            try:
                for scheduling in ("fair", "fifo"):  # both start at once: loading the model is most of a tiny run
                    port = free_port()
                    procs.append(start_serve(port, scheduling, keys_file, args.serve_args.split()))
                    urls[scheduling] = f"http://127.0.0.1:{port}"
                for proc, url in zip(procs, urls.values()):
                    wait_ready(url, proc)
                # One server measured at a time; the other idles (on a shared box it still holds memory only).
                result = scenario(urls["fair"], args.seconds, dict(keys), urls["fifo"], forms, args.big_concurrency)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=60)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
