"""A person on the page beside a bulk client: what preemption is for.

    python bench/page_user.py [--shares 0.5,0] [--asks 10] [--think-s 1] [--big-concurrency 64]

For each `--preempt-share`, one `serve` (demo model, `--torch-threads 1`); a person posts a 12 MP phone photo
(bench/photos.py) and one question through the page's form (`POST /`, as the no-JS form does), reads the answer
for `--think-s`, and asks again, `--asks` times: first alone, then while a bulk client (bench/fairness.py's: 4
questions a request, concurrency 64) keeps the server busy. Told apart by X-Forwarded-For (serve trusts it from
loopback). Prints the person's latencies and the bulk client's answers/s; the last line is JSON, one row per
share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fairness  # noqa: E402 - the bench folder is not a package
import photos  # noqa: E402

from vqa_async.cluster.supervisor import free_port  # noqa: E402
from vqa_async.tools.loadgen import Form, wait_ready  # noqa: E402

PERSON = "198.51.100.7"


async def person(url: str, photo: bytes, asks: int, think_s: float) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as s:
        for _ in range(asks):
            form = aiohttp.FormData()
            form.add_field("image", photo, filename="phone.jpg", content_type="image/jpeg")
            form.add_field("question", "what animal is this?")
            t0 = time.monotonic()
            async with s.post(url + "/", data=form, headers={"X-Forwarded-For": PERSON, "Origin": url}) as r:
                body = await r.text()
                if r.status != 200:
                    raise RuntimeError(f"the page answered {r.status}: {body[:200]}")
            latencies.append(round((time.monotonic() - t0) * 1000, 1))
            await asyncio.sleep(think_s)
    return latencies


async def beside_bulk(url: str, photo: bytes, asks: int, think_s: float, big_forms: list[Form],
                      big_concurrency: int) -> tuple[list[float], float]:
    """The person asks while the bulk client runs; the bulk client's window outlasts the person's asks."""
    big = fairness.Client("big", big_forms, big_concurrency, fairness.headers_for("big", None, 1))
    window = 2.0 + asks * (think_s + 1.0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        start = time.monotonic() + 1.0  # the bulk client's warm-up second is not counted
        bulk = asyncio.create_task(big.run(s, url, start, start + window))
        await asyncio.sleep(1.5)
        latencies = await person(url, photo, asks, think_s)
        await bulk
    return latencies, round(big.answers / window, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shares", default="0.5,0", help="--preempt-share values, one serve each (default 0.5,0)")
    p.add_argument("--asks", type=int, default=10)
    p.add_argument("--think-s", type=float, default=1.0, help="the person's pause between answers")
    p.add_argument("--big-concurrency", type=int, default=64)
    args = p.parse_args(argv)
    photo = next(ph for ph in photos.build() if ph.path.name.endswith("-12mp.jpg")).path.read_bytes()
    big_forms = asyncio.run(fairness._forms(64, fairness.BIG_QUESTIONS))
    rows: list[dict[str, Any]] = []
    for share in args.shares.split(","):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "vqa_async.cli", "serve", "--port", str(port),
                                 "--access-log", "off", "--torch-threads", "1", "--preempt-share", share],
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            alone = asyncio.run(person(url, photo, args.asks, args.think_s))
            shared, big_rate = asyncio.run(beside_bulk(url, photo, args.asks, args.think_s, big_forms,
                                                       args.big_concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        row = {"preempt_share": float(share), "person_median_ms_alone": statistics.median(alone),
               "person_max_ms_alone": max(alone), "person_median_ms_beside_bulk": statistics.median(shared),
               "person_max_ms_beside_bulk": max(shared), "bulk_answers_per_s": big_rate}
        print(f"share {share}: person {row['person_median_ms_alone']} ms alone (max {row['person_max_ms_alone']}), "
              f"{row['person_median_ms_beside_bulk']} ms beside the bulk client (max "
              f"{row['person_max_ms_beside_bulk']}); bulk {big_rate} answers/s", file=sys.stderr)
        rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
