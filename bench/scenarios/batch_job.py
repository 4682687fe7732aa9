"""`vqa-async batch` against the bench's own load generator on the same load: answers/s of each and their ratio.

    python -m bench batch-job [--requests 2000] [--concurrency 8] [--repeats 3] [--target serve|cluster]
        [--model DIR] [--workers 2] [any other serve flag]

Starts one `serve` (or the cluster) with the bench's settings. Each repeat, in alternating order: (1) writes
--requests images to files (easy-VQA's, cycled, each stamped new: bench.lib.workloads) with a plain-form INPUT
line each (`custom_id`, `image`, `question`) and runs `vqa-async batch INPUT OUTPUT --url URL --concurrency C
--no-progress` in a process of its own, reading the rate its summary ends on (answered / elapsed: the bar's
average); (2) sends the same pictures and questions, stamped anew, from the bench's closed-loop load generator
at the same concurrency (bodies encoded before the clock starts). Every upload is new to the server; what it
counted (model calls, mean batch, cache hits: 0) is read around each run; a small run of each warms the system
up first. Issue 22's target: the batch job's
rate within 10 % of the bench's. The last stdout line is JSON: the runs and the ratio's median [min-max].
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib.loadgen import load
from bench.lib.metrics import counted
from bench.lib.systems import System, add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import STAMP, Picture, Workload, content_type, forms_of, source_images

RATE = re.compile(r"answered (\d+), failed (\d+).*?([\d.]+) answers/s")


def write_job(folder: Path, pictures: list[Picture], n: int) -> Path:
    """n images, each stamped new, and the INPUT.jsonl that asks about them."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        p = pictures[i % len(pictures)]
        data = STAMP(p.data)
        name = f"{i}.{'jpg' if content_type(data)[1] == 'image/jpeg' else 'png'}"
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"custom_id": f"line-{i}", "image": name, "question": p.question}))
    job = folder / "input.jsonl"
    job.write_text("\n".join(lines) + "\n")
    return job


def run_batch_job(sysm: System, job: Path, concurrency: int) -> dict[str, Any]:
    before = counted(sysm.metrics_urls)
    proc = subprocess.run([sys.executable, "-m", "vqa_async.cli", "batch", str(job), str(job.parent / "out.jsonl"),
                           "--url", sysm.url, "--concurrency", str(concurrency), "--no-progress"],
                          capture_output=True, text=True, timeout=3600)
    seen = counted(sysm.metrics_urls) - before
    m = RATE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"vqa-async batch failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-2000:]}")
    return {"who": "batch-job", "answered": int(m[1]), "failed": int(m[2]), "answers_per_s": float(m[3]),
            **seen.row(int(m[1]))}


def run_bench(sysm: System, pictures: list[Picture], n: int, concurrency: int) -> dict[str, Any]:
    forms = forms_of(Workload("distinct", pictures=pictures).jobs(n))  # write_job's pictures, in its order
    before = counted(sysm.metrics_urls)
    t0 = time.monotonic()
    results = load(sysm.url + "/v1/vqa", forms, concurrency)
    wall = time.monotonic() - t0
    seen = counted(sysm.metrics_urls) - before
    ok = sum(r.status == 200 for r in results)
    return {"who": "bench", "answered": ok, "failed": len(results) - ok, "answers_per_s": round(ok / wall, 2),
            **seen.row(ok)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench batch-job", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", choices=["serve", "cluster"], default="serve")
    add_setup_arguments(ap)
    args, extra = ap.parse_known_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vqa-bench-batch-job-"))
    setup = setup_from(args, extra, log_dir=tmp)
    pictures = source_images(None)
    runs: list[dict[str, Any]] = []
    try:
        sysm = start(args.target, setup)
        # Warm-up, both ways (not counted): connections, first batches, and the first job's run, which on a fresh
        # cluster was 0.77x the next ones (bench/RESULTS.md, "Bulk jobs").
        warm = min(200, args.requests)
        run_bench(sysm, pictures, warm, args.concurrency)
        run_batch_job(sysm, write_job(tmp / "warm-up", pictures, warm), args.concurrency)
        for r in range(args.repeats):
            job = write_job(tmp / f"repeat-{r}", pictures, args.requests)
            pair = []
            for who in (("batch-job", "bench") if r % 2 == 0 else ("bench", "batch-job")):
                row = (run_batch_job(sysm, job, args.concurrency) if who == "batch-job"
                       else run_bench(sysm, pictures, args.requests, args.concurrency))
                row["repeat"] = r
                pair.append(row)
                print(json.dumps(row), file=sys.stderr)
            runs += pair
    finally:
        stop_all()
    ratios = []
    for r in range(args.repeats):
        by = {row["who"]: row for row in runs if row["repeat"] == r}
        ratios.append(round(by["batch-job"]["answers_per_s"] / by["bench"]["answers_per_s"], 3))
    out = {"target": args.target, "concurrency": args.concurrency, "requests": args.requests, "runs": runs,
           "ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
           "ratio_max": max(ratios)}
    print(f"batch job / bench answers/s at concurrency {args.concurrency} ({args.target}): "
          f"{out['ratio_median']} [{min(ratios)}-{max(ratios)}] (target >= 0.9)", file=sys.stderr)
    print(json.dumps(out))
