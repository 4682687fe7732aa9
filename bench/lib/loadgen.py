"""The bench's one load generator: closed-loop clients, each sending its next request as soon as its previous
answer came back. Used by every scenario and by the tests.

A client takes a *job* at a time from a shared iterator: one request, or a person's follow-up questions about one
image in a row (sent by `image_id` where the server's first answer names one, else with the same bytes again).
Clients may each have their own source address (`sources`: many people, as a server sees them in production),
and the run may last a fixed number of jobs or until a deadline (`until`; what is still in flight then is not
counted).

    python -m bench.lib.loadgen --url http://127.0.0.1:8000/v1/vqa --requests 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

# What it sends is built in forms.py; these names stay importable from here, where the tests and scenarios take them.
from bench.lib.forms import BOUNDARY as BOUNDARY
from bench.lib.forms import Form, Job, multipart
from bench.lib.forms import easy_vqa_requests as easy_vqa_requests
from bench.lib.forms import encode_forms as encode_forms
from vqa_async.testing.launch import wait_ready  # noqa: F401 - the one readiness wait, re-exported


@dataclass
class Result:
    status: int  # 0: no HTTP response (connection error)
    latency_s: float
    answer: str | None = None
    served_by: str | None = None
    batch_size: int | None = None
    error: str | None = None
    started: float = 0.0  # time.monotonic() when sent
    answers: int = 0  # questions answered (a multi-question request answers several)
    by_image_id: bool = False  # a follow-up sent by the server's image_id instead of the bytes
    client: int = 0  # which closed-loop client sent it
    image_id: str | None = None  # the server's name for the upload, where it gives one (follow-ups use it)
    reuploaded: bool = False  # a follow-up by image_id answered 409 (not cached), so the image was sent again

    @property
    def done(self) -> float:
        return self.started + self.latency_s


def load(url: str, requests: Any, concurrency: int, **kwargs: Any) -> list[Result]:
    """`run_load` on uvloop (the loop the servers run on too): less of the shared CPU goes to the client."""
    return uvloop.run(run_load(url, requests, concurrency, **kwargs))


def _jobs(requests: Iterable[Any]) -> Iterator[Job]:
    for r in requests:
        if isinstance(r, Form):
            yield (r,)
        elif r and isinstance(r[0], bytes | bytearray):  # an (image, question) pair
            yield (multipart(bytes(r[0]), [str(r[1])]),)
        else:
            yield tuple(r)


@dataclass
class _Run:
    url: str
    jobs: Iterator[Job]
    until: float | None
    headers: dict[str, str]
    think_s: float = 0.0
    results: list[Result] = field(default_factory=list)

    async def client(self, k: int, session: aiohttp.ClientSession) -> None:
        while self.until is None or time.monotonic() < self.until:
            job = next(self.jobs, None)
            if job is None:
                return
            image_id: str | None = None
            for i, form in enumerate(job):
                if i and image_id:  # a follow-up about the image the server already holds
                    res = await self.send(session, multipart(None, form.questions, fields=[("image_id", image_id)]),
                                          k, by_image_id=True)
                    if res.status == 409:  # image_not_cached (evicted, or no cache): send the image again
                        res = await self.send(session, form, k, by_image_id=False)
                        res.reuploaded = True
                else:
                    res = await self.send(session, form, k, by_image_id=False)
                self.results.append(res)
                if i == 0:
                    image_id = res.image_id
                if self.think_s:  # a person reading the answer before asking again
                    await asyncio.sleep(self.think_s)

    async def send(self, session: aiohttp.ClientSession, form: Form, k: int, by_image_id: bool) -> Result:
        t0 = time.monotonic()
        try:
            async with session.post(self.url, data=form.body,
                                    headers={**self.headers, "Content-Type": form.content_type}) as r:
                raw = await r.read()
                res = Result(r.status, time.monotonic() - t0, served_by=r.headers.get("X-Served-By"), started=t0,
                            by_image_id=by_image_id, client=k)
                if r.status == 200 and r.content_type != "application/json":  # the page's HTML answer
                    res.answers = 1
                elif r.status == 200:
                    reply = orjson.loads(raw)
                    res.answer, res.batch_size = reply.get("answer"), reply.get("batch_size")
                    res.answers = len(reply["answers"]) if "answers" in reply else 1
                    res.image_id = reply.get("image_id")
                else:
                    res.error = raw[:200].decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:  # orjson's error is a ValueError
            res = Result(0, time.monotonic() - t0, error=f"{type(e).__name__}: {e}", started=t0, client=k)
        return res


async def run_load(url: str, requests: Iterable[Any], concurrency: int, timeout_s: float = 60.0,
                   ssl_context: ssl.SSLContext | None = None, sources: Sequence[str] | None = None,
                   until: float | None = None, drain_s: float = 5.0,
                   headers: dict[str, str] | None = None, think_s: float = 0.0) -> list[Result]:
    """Sends `requests` (Forms, (image, question) pairs, or Jobs: tuples of Forms sent in a row by one client)
    from `concurrency` closed-loop clients.

    `sources`: client i connects from `sources[i % len(sources)]` (its own connection pool). `until`: a
    time.monotonic() after which no client starts a job; requests still in flight get `drain_s` more, then are
    cancelled and not reported. `ssl_context`: an https URL's CA (a self-signed front). `think_s`: each client's
    pause after an answer (a person reading it)."""
    run = _Run(url, _jobs(requests), until, headers or {}, think_s)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    tls: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
    sessions: list[aiohttp.ClientSession] = []
    try:
        if sources:
            for k in range(concurrency):
                connector = aiohttp.TCPConnector(limit=1, ssl=tls, local_addr=(sources[k % len(sources)], 0))
                sessions.append(aiohttp.ClientSession(connector=connector, timeout=timeout))
        else:
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, ssl=tls),
                                                  timeout=timeout))
        tasks = [asyncio.ensure_future(run.client(k, sessions[k % len(sessions)])) for k in range(concurrency)]
        if until is None:
            await asyncio.gather(*tasks)
        else:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, until - time.monotonic()) + drain_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for s in sessions:
            await s.close()
    return run.results


def percentile(sorted_ms: list[float], p: float) -> float:
    """The p-th percentile (nearest rank below) of an ascending list, rounded to 0.1."""
    return round(sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))], 1)


def summarize(results: list[Result], wall_s: float, window: tuple[float, float] | None = None) -> dict[str, Any]:
    """answers/s, latency percentiles (ms) and failures. `window` (start, end) in time.monotonic(): only requests
    sent and answered inside it count, and the rate is over the window (a run that lasted a time)."""
    if window is not None:
        results = [r for r in results if r.started >= window[0] and r.done <= window[1]]
        wall_s = window[1] - window[0]
    ok = [r for r in results if r.status == 200]
    lat = sorted(r.latency_s * 1000 for r in ok) or [0.0]
    sizes = [r.batch_size for r in ok if r.batch_size]
    statuses = Counter(r.status for r in results if r.status != 200)
    return {"requests": len(results), "failures": len(results) - len(ok),
            "answers_per_s": round(sum(r.answers for r in ok) / wall_s, 2) if wall_s else 0.0,
            "requests_per_s": round(len(ok) / wall_s, 2) if wall_s else 0.0,
            "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
            "mean_batch_size_seen": round(statistics.mean(sizes), 2) if sizes else 0.0,
            "max_batch_size_seen": max(sizes) if sizes else 0,
            "failed_by_status": {str(k): v for k, v in sorted(statuses.items())},
            "follow_ups_by_image_id": sum(r.by_image_id for r in results),
            "follow_ups_reuploaded": sum(r.reuploaded for r in results)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1/vqa")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)
    from bench.lib.workloads import Workload

    jobs = list(Workload("distinct").jobs(args.requests))
    t0 = time.monotonic()
    results = load(args.url, jobs, args.concurrency)
    print(json.dumps({"concurrency": args.concurrency, "pid": os.getpid(),
                      **summarize(results, time.monotonic() - t0)}))


if __name__ == "__main__":
    main()
