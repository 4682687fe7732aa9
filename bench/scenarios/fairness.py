"""fairness: a bulk client beside a closed-loop light one on one `serve` (fair scheduling vs fifo).

    python -m bench fairness [--seconds 20] [--repeats 3] [--big-concurrency 64] [--settings fair,fifo]
        [--serve-args "--torch-threads 1"] [--model DIR] [--out DIR]

One "big" client at concurrency 64 sends 4-question requests; one "small" client at concurrency 1 sends single
questions; each from its own address (127.0.0.2 and 127.0.0.3: serve tells clients apart by address), every
upload new (a unique trailer: no cache hit or per-batch dedup helps either). For each setting (`fair`: serve's
default scheduling with its default --preempt-share; `fifo`: --scheduling fifo; `share0`: --preempt-share 0; or
NAME=FLAGS) one serve is started, and each repeat measures, on every serve in turn: the small client alone, the
big client alone, and both together. Reported per setting, as median [min–max] of the repeats: the small client's
P95 alone and shared and their ratio (computed within each repeat), the big client's answers/s alone and shared
and its share. Targets: issue 13, small P95 shared <= 2x alone and big >= 90 % of alone; issue 19, with default
settings, small P95 shared <= 3x alone. The last stdout line is JSON: one row per setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.lib import report
from bench.lib.loadgen import Result, percentile, run_load, summarize
from bench.lib.systems import Setup, System, start, stop_all
from bench.lib.workloads import Workload
from bench.scenarios.many_people import SETTINGS, settings_from

BIG_QUESTIONS = 4
BIG, SMALL = "127.0.0.2", "127.0.0.3"
WARMUP_S = 1.0


async def _phase(url: str, clients: dict[str, tuple[Workload, int, str]], seconds: float) -> dict[str, list[Result]]:
    start_at = time.monotonic() + WARMUP_S
    until = start_at + seconds
    names = list(clients)
    got = await asyncio.gather(*(run_load(url + "/v1/vqa", w.endless(), c, timeout_s=120, sources=[addr],
                                          until=until, drain_s=0.2) for w, c, addr in clients.values()))
    # Only what was sent and answered inside the window counts.
    return {n: [r for r in res if r.started >= start_at and r.done <= until] for n, res in zip(names, got)}


def phase(url: str, clients: dict[str, tuple[Workload, int, str]], seconds: float) -> dict[str, dict[str, Any]]:
    out = {}
    for name, res in uvloop.run(_phase(url, clients, seconds)).items():
        s = summarize(res, seconds)
        s["p95_ms"] = percentile(sorted(r.latency_s * 1000 for r in res if r.status == 200), 95) if s[
            "requests"] - s["failures"] else None
        out[name] = s
    return out


def measure(sysm: System, seconds: float, big_concurrency: int) -> dict[str, Any]:
    big = (Workload("multi", k=BIG_QUESTIONS), big_concurrency, BIG)
    small = (Workload("distinct"), 1, SMALL)
    s_alone = phase(sysm.url, {"small": small}, seconds)["small"]
    b_alone = phase(sysm.url, {"big": big}, seconds)["big"]
    shared = phase(sysm.url, {"small": small, "big": big}, seconds)
    row = {"small_p95_alone_ms": s_alone["p95_ms"], "small_p95_shared_ms": shared["small"]["p95_ms"],
           "big_answers_per_s_alone": b_alone["answers_per_s"], "big_answers_per_s_shared": shared["big"][
               "answers_per_s"], "failures": sum(p["failures"] for p in (s_alone, b_alone, *shared.values()))}
    row["ratio"] = round(row["small_p95_shared_ms"] / row["small_p95_alone_ms"], 3) if row[
        "small_p95_alone_ms"] and row["small_p95_shared_ms"] else None
    row["big_share"] = round(row["big_answers_per_s_shared"] / row["big_answers_per_s_alone"], 3) if row[
        "big_answers_per_s_alone"] else None
    return row


def fold(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        mine = [r for r in runs if r["setting"] == setting]
        row: dict[str, Any] = {"setting": setting, "flags": mine[0]["flags"], "repeats": len(mine)}
        for key in ("small_p95_alone_ms", "small_p95_shared_ms", "big_answers_per_s_alone",
                    "big_answers_per_s_shared", "ratio", "big_share"):
            vals = [r[key] for r in mine if r[key] is not None]
            row[key] = round(statistics.median(vals), 3) if vals else None
            row[f"{key}_spread"] = report.spread(vals)
        row["failures"] = sum(r["failures"] for r in mine)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench fairness", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time of each phase")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--big-concurrency", type=int, default=64, help="the big client's concurrency (tests: less)")
    p.add_argument("--settings", default="fair,fifo", help="fair, fifo, share0, or NAME=FLAGS")
    # One torch thread: on a small shared CPU box torch's default threads spin against each other.
    p.add_argument("--serve-args", default="--torch-threads 1",
                   help="options for every serve this starts (default: '--torch-threads 1'), e.g. '--device cuda'")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None, help="also write DIR/fairness.json")
    args = p.parse_args(argv)
    settings = settings_from(args.settings, {"fair": [], **SETTINGS})
    setup = Setup(model=args.model, serve_flags=args.serve_args.split())
    runs: list[dict[str, Any]] = []
    try:
        up = {name: start("serve", setup, flags, label=f"serve {name}") for name, flags in settings.items()}
        names = list(up)
        for sysm in up.values():  # the first model calls of a process are slow: keep them out
            phase(sysm.url, {"big": (Workload("multi", k=BIG_QUESTIONS), 2, BIG),
                             "small": (Workload("distinct"), 1, SMALL)}, 1.0)
        for rep in range(args.repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                row = measure(up[name], args.seconds, args.big_concurrency)
                print(f"repeat {rep + 1} {name}: small p95 {row['small_p95_alone_ms']} -> {row['small_p95_shared_ms']}"
                      f" ms ({row['ratio']}x), big {row['big_answers_per_s_alone']} -> "
                      f"{row['big_answers_per_s_shared']} answers/s", file=sys.stderr, flush=True)
                runs.append({"setting": name, "flags": " ".join(settings[name]), "repeat": rep, **row})
    finally:
        stop_all()
    rows = fold(runs)
    for r in rows:
        print(f"{r['setting']:8s} small P95 shared/alone {report.text(r['ratio_spread'])}, big share "
              f"{report.text(r['big_share_spread'])} (median [min–max] of {r['repeats']} repeats)", file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fairness.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=2) + "\n")
    print(json.dumps(rows))
