"""Where the time goes: CPU time per answer and per batch, by stage and by process, under load.

    python -m bench breakdown [--system cluster|serve] [--workers N] [--concurrency 32] [--requests 1000]
        [--model DIR] [--images FOLDER|photos] [--workload distinct] [--out DIR] [any other serve flag]

It starts the system (bench.lib.systems, as every scenario does), sends a closed-loop load of uploads it has
never seen (warm-up included: the `distinct` workload by default), and reads CPU time from three sources:
the load generator's own process (this one), HAProxy's and the supervisor's /proc entries, and each worker's
/metrics (`process_cpu_seconds_total`, and `vqa_stage_cpu_seconds{stage}` for decode, preprocess, vision
encoder and decoder). A worker's HTTP share is its process CPU minus its stages. The stage figures are thread CPU
times, so they are whole only when torch runs one thread per worker (the cluster's default on CPU); on CUDA read
the model stages' wall times (the executor synchronizes after the vision encoder). Writes DIR/breakdown.json and
DIR/breakdown.md, with the cache hits and dedups the workers counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.lib.loadgen import load, summarize
from bench.lib.metrics import counted, scrape
from bench.lib.systems import System, add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import WORKLOADS, Workload, mean_megapixels
from vqa_async.metrics import STAGES

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def snapshot(sysm: System) -> dict[str, Any]:
    t = os.times()
    snap: dict[str, Any] = {"loadgen": t.user + t.system, "workers": [scrape(u) for u in sysm.metrics_urls]}
    if sysm.state:
        snap["haproxy"] = proc_cpu(sysm.state["haproxy_pid"])
        snap["supervisor"] = proc_cpu(sysm.state["pid"])
    return snap


def profile(before: dict[str, Any], after: dict[str, Any], answers: int, wall: float) -> dict[str, Any]:
    def worker_sum(key: str) -> float:
        return sum(a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after["workers"], before["workers"], strict=True))

    cpu: dict[str, float] = {"load generator": after["loadgen"] - before["loadgen"]}
    if "haproxy" in after:
        cpu["HAProxy"] = after["haproxy"] - before["haproxy"]
        cpu["supervisor"] = after["supervisor"] - before["supervisor"]
    stages = {s: worker_sum(f'vqa_stage_cpu_seconds_total{{stage="{s}"}}') for s in STAGES}
    worker_total = worker_sum("process_cpu_seconds_total")
    cpu["worker: HTTP, JSON, queue, batching (the rest)"] = worker_total - sum(stages.values())
    for s, v in stages.items():
        cpu[f"worker: {s}"] = v
    calls = worker_sum("vqa_batch_size_count")
    batch = worker_sum("vqa_batch_size_sum") / calls if calls else 0.0
    total = sum(cpu.values())
    rows = [{"part": k, "cpu_s": round(v, 3), "ms_per_answer": round(1000 * v / answers, 3),
             "ms_per_batch": round(1000 * v / calls, 2) if calls else 0.0, "share": round(v / total, 3)}
            for k, v in cpu.items()]
    wall_stage = {s: worker_sum(f'vqa_stage_seconds_total{{stage="{s}"}}') for s in ("vision", "decoder")}
    return {"answers": answers, "wall_s": round(wall, 2), "answers_per_s": round(answers / wall, 1),
            "cores": os.cpu_count(), "cpu_busy": round(total / (wall * (os.cpu_count() or 1)), 3),
            "model_calls": int(calls), "mean_batch_size": round(batch, 2),
            "model_wall_ms_per_batch": {s: round(1000 * v / calls, 2) if calls else 0.0 for s, v in wall_stage.items()},
            "model_share_of_cpu": round((stages["vision"] + stages["decoder"]) / total, 3), "rows": rows,
            # the upload path: decode (bytes to an upright RGB image) + preprocess (resize, hash, tokenize)
            "upload": {"ms_per_image": round(1000 * (stages["decode"] + stages["preprocess"]) / answers, 3),
                       "share": round((stages["decode"] + stages["preprocess"]) / total, 3)}}


def markdown(p: dict[str, Any], command: str) -> str:
    lines = [f"command: `{command}`", "",
             f"{p['answers']} answers in {p['wall_s']} s ({p['answers_per_s']}/s), {p['model_calls']} model calls of "
             f"{p['mean_batch_size']} questions on average; the {p['cores']} cores were "
             f"{100 * p['cpu_busy']:.0f}% busy.",
             "", "| part | CPU ms per answer | CPU ms per batch | share of all CPU |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['part']} | {r['ms_per_answer']} | {r['ms_per_batch']} | {100 * r['share']:.1f}% |"
              for r in p["rows"]]
    w = p["model_wall_ms_per_batch"]
    lines += ["", f"Model wall time per batch: vision encoder {w['vision']} ms, decoder {w['decoder']} ms. "
              f"The model (vision + decoder) is {100 * p['model_share_of_cpu']:.1f}% of all CPU time spent."]
    d = p["upload"]
    lines += ["", f"Uploads (images of {p['image_mp']} MP on average): decode and resize take {d['ms_per_image']} ms "
              f"of CPU per image, {100 * d['share']:.1f}% of all CPU time spent."]
    lines += ["", f"Workload `{p['workload']}`: the workers counted {p['cache_hits']} cache hits, {p['cache_misses']} "
              f"misses and {p['dedups']} per-batch dedups."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench breakdown", description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="cluster", choices=["cluster", "serve"])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--images", default=None, help="a folder of images, or `photos` (default: easy-VQA's test split)")
    ap.add_argument("--workload", default="distinct", choices=WORKLOADS)
    ap.add_argument("--out", default="bench/out")
    add_setup_arguments(ap)
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.workload, args.images)
    jobs = workload.jobs(args.requests)
    sources = workload.sources(args.concurrency)
    sysm = start(args.system, setup_from(args, extra, log_dir=out / "logs"))
    try:
        load(sysm.url + "/v1/vqa", workload.jobs(200), args.concurrency, sources=sources)  # warm-up
        cache0 = counted(sysm.metrics_urls)
        before = snapshot(sysm)
        t0 = time.monotonic()
        results = load(sysm.url + "/v1/vqa", jobs, args.concurrency, timeout_s=300, sources=sources)
        wall = time.monotonic() - t0
        after = snapshot(sysm)
        cache = counted(sysm.metrics_urls) - cache0
    finally:
        stop_all()
    summary = summarize(results, wall)
    answers = sum(r.answers for r in results if r.status == 200)
    p = {**profile(before, after, answers, wall), "load": summary,
         "image_mp": mean_megapixels(workload.pictures), "images": args.images or "easy-VQA test split",
         "system": args.system, "workers": args.workers if args.system == "cluster" else 1,
         "concurrency": args.concurrency, "workload": workload.name, "cache_hits": int(cache.cache_hits),
         "cache_misses": int(cache.cache_misses), "dedups": int(cache.dedups)}
    command = " ".join(["python -m bench breakdown"] + sys.argv[1:])
    (out / "breakdown.json").write_text(json.dumps({**p, "command": command}, indent=2) + "\n")
    (out / "breakdown.md").write_text(markdown(p, command))
    print(markdown(p, command))


if __name__ == "__main__":
    main()
