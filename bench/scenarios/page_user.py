"""page-user: a person on the page beside a bulk client, per --preempt-share (what preemption is for).

    python -m bench page-user [--shares 0.5,0] [--asks 10] [--think-s 1] [--big-concurrency 64] [--repeats 3]

For each `--preempt-share`, one `serve` (demo model, `--torch-threads 1`). A person posts a 12 MP phone photo
(bench.lib.photos) and one question through the page's form (`POST /`, as the no-JS form does), reads the answer
for `--think-s`, and asks again, `--asks` times; every post is a new upload (a unique trailer after the JPEG's end:
the same pixels, bytes the server has never seen). Each repeat measures, on every serve in turn: the person alone,
the bulk client alone (4 questions a request at concurrency 64, every upload new), and both together. The person
(127.0.0.3) and the bulk client (127.0.0.2) are told apart by their addresses. Reported per share, as median
[min–max] of the repeats: the person's median latency alone and beside the bulk client and their ratio, the bulk
client's answers/s alone and beside the person and its share (ratios computed within each repeat). Issue 19's
targets with default settings: the person <= 1.5x alone, the bulk client keeps >= 90 %. The last line is JSON,
one row per share.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import uvloop

from bench.lib import report
from bench.lib.loadgen import multipart, run_load, summarize
from bench.lib.photos import build
from bench.lib.systems import Setup, start, stop_all
from bench.lib.workloads import STAMP, Workload
from bench.scenarios.fairness import BIG, BIG_QUESTIONS

PERSON = "127.0.0.3"


def person_jobs(photo: bytes, asks: int) -> list[tuple[Any, ...]]:
    return [(multipart(STAMP(photo), ["what animal is this?"], "phone.jpg", "image/jpeg"),) for _ in range(asks)]


async def person(url: str, photo: bytes, asks: int, think_s: float) -> list[float]:
    res = await run_load(url + "/", person_jobs(photo, asks), 1, timeout_s=120, sources=[PERSON],
                         headers={"Origin": url}, think_s=think_s)
    bad = [r for r in res if r.status != 200]
    if bad:
        raise RuntimeError(f"the page answered {bad[0].status}: {bad[0].error}")
    return [round(r.latency_s * 1000, 1) for r in res]


async def bulk(url: str, big_concurrency: int, seconds: float) -> float:
    start_at = time.monotonic() + 1.0  # the bulk client's warm-up second is not counted
    res = await run_load(url + "/v1/vqa", Workload("multi", k=BIG_QUESTIONS).endless(), big_concurrency,
                         timeout_s=120, sources=[BIG], until=start_at + seconds, drain_s=0.2)
    return float(summarize(res, seconds, window=(start_at, start_at + seconds))["answers_per_s"])


async def beside_bulk(url: str, photo: bytes, asks: int, think_s: float, big_concurrency: int,
                      window: float) -> tuple[list[float], float]:
    """The person asks while the bulk client runs; the bulk client's window outlasts the person's asks."""
    rate = asyncio.create_task(bulk(url, big_concurrency, window))
    await asyncio.sleep(1.5)
    latencies = await person(url, photo, asks, think_s)
    return latencies, await rate


def measure(url: str, photo: bytes, args: argparse.Namespace) -> dict[str, Any]:
    window = 2.0 + args.asks * (args.think_s + 1.0)
    alone = uvloop.run(person(url, photo, args.asks, args.think_s))
    bulk_alone = uvloop.run(bulk(url, args.big_concurrency, window))
    shared, bulk_shared = uvloop.run(beside_bulk(url, photo, args.asks, args.think_s, args.big_concurrency, window))
    row = {"person_median_ms_alone": statistics.median(alone), "person_max_ms_alone": max(alone),
           "person_median_ms_beside_bulk": statistics.median(shared), "person_max_ms_beside_bulk": max(shared),
           "bulk_answers_per_s_alone": round(bulk_alone, 1), "bulk_answers_per_s": round(bulk_shared, 1)}
    row["person_ratio"] = round(row["person_median_ms_beside_bulk"] / row["person_median_ms_alone"], 3)
    row["bulk_share"] = round(bulk_shared / bulk_alone, 3) if bulk_alone else None
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench page-user", description=__doc__.split("\n\n")[0])
    p.add_argument("--shares", default="0.5,0", help="--preempt-share values, one serve each (default 0.5,0)")
    p.add_argument("--asks", type=int, default=10)
    p.add_argument("--think-s", type=float, default=1.0, help="the person's pause between answers")
    p.add_argument("--big-concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve-args", default="--torch-threads 1", help="options for every serve this starts")
    args = p.parse_args(argv)
    photo = next(ph for ph in build() if ph.path.name.endswith("-12mp.jpg")).path.read_bytes()
    shares = args.shares.split(",")
    setup = Setup(serve_flags=args.serve_args.split())
    runs: list[dict[str, Any]] = []
    try:
        up = {share: start("serve", setup, ["--preempt-share", share], label=f"serve share {share}")
              for share in shares}
        for sysm in up.values():  # the first model calls of a process are slow: keep them out
            uvloop.run(bulk(sysm.url, args.big_concurrency, 1.0))
            uvloop.run(person(sysm.url, photo, 1, 0.0))
        for rep in range(args.repeats):
            for share in shares[rep % len(shares):] + shares[:rep % len(shares)]:
                row = measure(up[share].url, photo, args)
                print(f"repeat {rep + 1} share {share}: person {row['person_median_ms_alone']} ms alone, "
                      f"{row['person_median_ms_beside_bulk']} ms beside the bulk client; bulk "
                      f"{row['bulk_answers_per_s_alone']} -> {row['bulk_answers_per_s']} answers/s", file=sys.stderr,
                      flush=True)
                runs.append({"preempt_share": float(share), "repeat": rep, **row})
    finally:
        stop_all()
    rows = []
    for share in shares:
        mine = [r for r in runs if r["preempt_share"] == float(share)]
        row: dict[str, Any] = {"preempt_share": float(share), "repeats": len(mine)}
        for key in mine[0]:
            if key not in ("preempt_share", "repeat"):
                vals = [r[key] for r in mine if r[key] is not None]
                row[key] = round(statistics.median(vals), 3) if vals else None
                if key in ("person_ratio", "bulk_share", "person_median_ms_beside_bulk", "bulk_answers_per_s"):
                    row[f"{key}_spread"] = report.spread(vals)
        print(f"share {share}: person beside/alone {report.text(row['person_ratio_spread'])}, bulk share "
              f"{report.text(row['bulk_share_spread'])} (median [min–max] of {len(mine)} repeats)", file=sys.stderr)
        rows.append(row)
    print(json.dumps(rows))
