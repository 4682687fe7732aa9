"""sweep: systems side by side over concurrency levels, on one workload, repeated, every upload new.

    python -m bench sweep --systems baseline,serve,cluster,ceiling,litserve --concurrency 8,32
        --workload distinct|follow-up|multi|many-people --repeats 3 --requests 600 [--images photos|FOLDER]
        [--model DIR] [--k 4] [--torch-threads N] [--workers 2] --out DIR [any other serve flag]

Every system is started once (bench.lib.systems: the same torch threads and OMP_WAIT_POLICY for all), then each
repeat measures every level, and within a level every system one after another (the order rotates from repeat
to repeat), so that the rows a ratio divides are taken close together in time. Each row is a warm-up and a
measured closed-loop run, both with uploads no system has seen in this run; the servers' cache hits, misses and
dedups during the row come from their /metrics. While one system is measured every other is frozen
(SIGSTOP, bench.lib.freeze: idle LitServe polls a quarter of a core) and each row records the CPU seconds the
others used meanwhile (`others_cpu_s`, ~0; `--no-freeze`: the old way). Writes DIR/results.json (one row per
system and concurrency: the median of the repeats with min and max), DIR/run.json (every repeat, the per-repeat
ratios, the targets), DIR/results.md and DIR/plot.png. Unknown flags go to serve and cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.lib import report
from bench.lib.freeze import frozen, tree, tree_cpu
from bench.lib.loadgen import load, summarize
from bench.lib.metrics import Counted, counted
from bench.lib.systems import SYSTEMS, Ceiling, Setup, System, add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import WORKLOADS, Workload, mean_megapixels

ROOT = Path(__file__).resolve().parents[2]


def measure(sysm: System, workload: Workload, concurrency: int, requests: int) -> dict[str, Any]:
    """One row: a warm-up of max(2, concurrency) requests, then `requests`, every upload stamped anew. Cache
    hits, misses and dedups are counted over both; batch figures over the measured part."""
    url = sysm.url + "/v1/vqa"
    sources = workload.sources(concurrency)
    warm = workload.jobs(max(2, concurrency) * (workload.k if workload.name == "follow-up" else 1))
    jobs = workload.jobs(requests)
    before = counted(sysm.metrics_urls) if sysm.metrics_urls else None
    load(url, warm, concurrency, sources=sources)
    mid = counted(sysm.metrics_urls) if sysm.metrics_urls else None
    pids = tree(sysm.proc.pid) if sysm.proc is not None else []
    cpu0 = tree_cpu(pids)
    t0 = time.monotonic()
    results = load(url, jobs, concurrency, timeout_s=300, sources=sources)
    wall = time.monotonic() - t0
    cpu = tree_cpu(pids) - cpu0
    row = summarize(results, wall)
    answers = sum(r.answers for r in results if r.status == 200)
    # All the system's processes (HAProxy, workers, LitServe's): robust where answers/s is not (a shared box).
    row["cpu_ms_per_answer"] = round(1000 * cpu / answers, 3) if answers and pids else None
    if before is not None and mid is not None:
        after = counted(sysm.metrics_urls)
        whole: Counted = after - before
        row.update((after - mid).row(answers))
        row.update(cache_hits=int(whole.cache_hits), cache_misses=int(whole.cache_misses), dedups=int(whole.dedups))
    else:  # no /metrics and no cache: the baseline answers one at a time; LitServe batches on its own
        row.update(cache_hits=None, cache_misses=None, dedups=None, cpu_ms_per_image=None,
                   mean_batch_size=1.0 if sysm.name == "baseline" else None)
    return row


def others(up: Mapping[str, Any], name: str) -> list[int]:
    """The leader pids of every started system but `name` (the ceiling runs in this process: it is idle)."""
    return [s.proc.pid for n, s in up.items() if n != name and isinstance(s, System) and s.proc is not None]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def meta_for(args: argparse.Namespace, setup: Setup, workload: Workload, scenario: str) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "model": args.model or "vqa_async/demo",
            "device": args.device, "decoder": args.decoder, "workload": workload.name, "k": workload.k,
            "images": args.images or "easy-VQA test split", "image_mp": mean_megapixels(workload.pictures),
            "requests": args.requests, "repeats": args.repeats, "workers": args.workers,
            "threads": args.torch_threads or "cores / model processes", "omp_wait_policy": setup.omp_wait_policy,
            "serve_flags": setup.serve_flags, "frozen_others": not getattr(args, "no_freeze", False),
            "machine": f"{os.cpu_count()} cores, {os.uname().machine}",
            "command": " ".join(["python -m bench", scenario] + sys.argv[1:])}


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench sweep", description=description)
    ap.add_argument("--systems", default="baseline,serve,cluster,ceiling", help=", ".join(SYSTEMS))
    ap.add_argument("--concurrency", default="1,8,32,100")
    ap.add_argument("--workload", default="distinct", choices=WORKLOADS)
    ap.add_argument("--k", type=int, default=4, help="questions per image (follow-up, multi)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200, help="measured requests per row")
    ap.add_argument("--images", default=None, help="`photos` (bench.lib.photos) or a folder (default: easy-VQA)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--no-freeze", action="store_true",
                    help="leave the other systems running while one is measured (the old, unfair way)")
    add_setup_arguments(ap)
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    args, extra = ap.parse_known_args(argv)
    if extra and not extra[0].startswith("--"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def main(argv: list[str] | None = None) -> None:
    args, extra = parse(parser(__doc__.splitlines()[0]), argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}: expected {', '.join(SYSTEMS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = setup_from(args, extra, log_dir=out / "logs")
    workload = Workload(args.workload, args.images, args.k)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> the finally below stops every system
    runs: list[dict[str, Any]] = []
    bar = tqdm(total=len(systems) * len(levels) * args.repeats, desc="sweep", unit="row")
    try:
        bar.set_postfix(status="starting")
        up: dict[str, System | Ceiling] = {}
        for name in systems:
            up[name] = Ceiling(setup, workload.pictures) if name == "ceiling" else start(name, setup)
        for rep in range(args.repeats):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for c in levels:
                for name in order:
                    bar.set_postfix(repeat=rep + 1, system=name, concurrency=c)
                    sysm = up[name]
                    with frozen([] if args.no_freeze else others(up, name)) as others_cpu:
                        row = sysm.measure(c, args.requests) if isinstance(sysm, Ceiling) else \
                            measure(sysm, workload, c, args.requests)
                        row["others_cpu_s"] = others_cpu()
                    runs.append({"system": name, "concurrency": c, "repeat": rep, "workload": workload.name,
                                 "images": args.images or "easy-vqa", **row})
                    bar.update(1)
    finally:
        stop_all()
        bar.close()
    rows = report.fold(runs)
    rows.sort(key=lambda r: (systems.index(r["system"]), r["concurrency"]))
    targets = report.write(out, rows, runs, meta_for(args, setup, workload, "sweep"), args.device)
    for name, per in report.ratios(runs).items():
        for c, s in per.items():
            print(f"{name} at concurrency {c}: {report.text(s)}")
    for t in targets:
        print("target " + t)
    print(f"wrote {out}/results.json, results.md, run.json, plot.png")
