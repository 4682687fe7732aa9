"""Where the time goes: CPU time per answer and per batch, by stage and by process, under load.

    python -m bench breakdown [--system cluster|serve] [--workers N] [--concurrency 32] [--requests 1000]
        [--model DIR] [--images FOLDER|photos] [--workload distinct] [--out DIR] [any other serve flag]
    python -m bench breakdown --systems cluster,litserve-fast [--images photos --model DIR] --concurrency 32

With `--systems`: both sides explained. Each system is started, and measured while the others are frozen
(bench.lib.freeze): a pass with no profiler gives the CPU of every process of the system from /proc, and a second
pass of the same load with py-spy on each Python process (bench.lib.profiler) splits each process's CPU into
stages (proxy, HTTP read+parse, middlewares+metrics, decode, preprocess, queue+collector, model, response, event
loop and other), the same rules for both systems; the report prints the systems side by side and what each pays
that the other does not.

Without it (the older form, one system):
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

from bench.lib.freeze import frozen, proc_cpu, tree
from bench.lib.loadgen import load, summarize
from bench.lib.metrics import counted, scrape
from bench.lib.profiler import STAGES as STAGE_NAMES
from bench.lib.profiler import Spies, split, thread_cpu
from bench.lib.systems import SYSTEMS, System, add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import WORKLOADS, Workload, mean_megapixels
from vqa_async.metrics import STAGES


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


def roles(sysm: System, pids: list[int]) -> dict[int, str]:
    """A name for each process of a system: the cluster's from its state.json, LitServe's by order of birth."""
    names = {pids[0]: "main"} if pids else {}
    if sysm.state:
        names[sysm.state["pid"]] = "supervisor"
        if sysm.state.get("haproxy_pid"):
            names[sysm.state["haproxy_pid"]] = "HAProxy"
        for i, w in enumerate(sysm.state["workers"]):
            if w.get("pid"):
                names[w["pid"]] = f"worker {i + 1}"
    for n, pid in enumerate(pids):
        names.setdefault(pid, f"process {n}")
    return names


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return ""


def explain(sysm: System, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """One system: a measured pass (CPU per process from /proc, no profiler running) and a profiled pass of the
    same load (py-spy on each Python process), whose samples split each process's measured CPU into stages."""
    sources = workload.sources(args.concurrency)
    url = sysm.url + "/v1/vqa"
    load(url, workload.jobs(200), args.concurrency, sources=sources)  # warm-up
    assert sysm.proc is not None
    pids = [p for p in tree(sysm.proc.pid) if proc_cpu(p) >= 0]
    names = roles(sysm, pids)
    cpu0, threads0, lg0 = {p: proc_cpu(p) for p in pids}, {p: thread_cpu(p) for p in pids}, os.times()
    t0 = time.monotonic()
    results = load(url, workload.jobs(args.requests), args.concurrency, timeout_s=300, sources=sources)
    wall = time.monotonic() - t0
    lg1, cpu = os.times(), {p: proc_cpu(p) - cpu0[p] for p in pids}
    threads = {p: {t: v - threads0[p].get(t, 0.0) for t, v in thread_cpu(p).items()} for p in pids}
    answers = sum(r.answers for r in results if r.status == 200)
    spies = Spies(pids, rate=args.profile_rate)
    try:
        load(url, workload.jobs(args.requests), args.concurrency, timeout_s=300, sources=sources)
    finally:
        samples = spies.stop(keep=Path(args.out) / "pyspy" / sysm.name)
    per = 1000 / max(1, answers)
    processes, stages = [], dict.fromkeys(STAGE_NAMES, 0.0)
    for pid in pids:
        got, spent = samples.get(pid, {}), cpu[pid] * per
        n = sum(sum(c.values()) for c in got.values())
        if names[pid] == "HAProxy":
            parts = {"proxy": spent}
        elif n:
            by_thread = split(threads[pid], got)  # CPU seconds per stage, from the threads' own CPU
            whole = sum(by_thread.values()) or 1.0
            parts = {k: spent * v / whole for k, v in by_thread.items()}
        else:
            parts = {"event loop, other": spent}
        for k, v in parts.items():
            stages[k] += v
        processes.append({"process": names[pid], "pid": pid, "cmdline": cmdline(pid),
                          "cpu_ms_per_answer": round(spent, 3), "samples": n, "threads": len(threads[pid]),
                          "stages": {k: round(v, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}})
    loadgen = (lg1.user + lg1.system - lg0.user - lg0.system) * per
    total = sum(stages.values())
    outside = total - sum(stages[k] for k in ("model", "decode", "preprocess"))
    return {"system": sysm.name, "answers": answers, "wall_s": round(wall, 2),
            "answers_per_s": round(answers / wall, 1), "load": summarize(results, wall),
            "load_generator_ms_per_answer": round(loadgen, 3), "processes": processes,
            "stages_ms_per_answer": {k: round(v, 3) for k, v in stages.items()},
            "total_ms_per_answer": round(total, 3), "outside_model_ms_per_answer": round(outside, 3)}


def side_by_side(systems: list[dict[str, Any]], command: str) -> str:
    names = [s["system"] for s in systems]
    lines = [f"command: `{command}`", "",
             "CPU ms per answer, measured from /proc on a pass with no profiler; each Python process's CPU split "
             "into stages: each of its threads' CPU (from /proc) by that thread's py-spy samples on a second, "
             "profiled pass of the same load (HAProxy is all `proxy`).", "",
             "| stage | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for k in STAGE_NAMES:
        lines.append(f"| {k} | " + " | ".join(str(s["stages_ms_per_answer"][k]) for s in systems) + " |")
    lines.append("| **outside the model** (all but decode, preprocess, model) | "
                 + " | ".join(f"**{s['outside_model_ms_per_answer']}**" for s in systems) + " |")
    lines.append("| **all the system's processes** | " + " | ".join(f"**{s['total_ms_per_answer']}**" for s in systems)
                 + " |")
    lines.append("| load generator (this process) | "
                 + " | ".join(str(s["load_generator_ms_per_answer"]) for s in systems) + " |")
    lines.append("| answers/s (measured pass) | " + " | ".join(str(s["answers_per_s"]) for s in systems) + " |")
    lines.append("| P95 ms (measured pass) | " + " | ".join(str(s["load"].get("p95_ms")) for s in systems) + " |")
    for s in systems:
        lines += ["", f"`{s['system']}`, by process (CPU ms per answer; the stages of each):", ""]
        for p in s["processes"]:
            top = ", ".join(f"{k} {v}" for k, v in p["stages"].items() if v >= 0.005)
            lines.append(f"- {p['process']} (pid {p['pid']}, {p['samples']} samples): {p['cpu_ms_per_answer']}"
                         + (f" = {top}" if top else ""))
    if len(systems) >= 2:
        a, b = systems[0], systems[1]
        for x, y in ((a, b), (b, a)):
            more = [(k, x["stages_ms_per_answer"][k] - y["stages_ms_per_answer"][k]) for k in STAGE_NAMES]
            more = [(k, d) for k, d in more if d >= 0.02]
            more.sort(key=lambda kv: -kv[1])
            lines += ["", f"What `{x['system']}` pays that `{y['system']}` does not (or pays less of), ms per answer: "
                      + (", ".join(f"{k} +{d:.3f}" for k, d in more) or "nothing above 0.02 ms") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench breakdown", description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="cluster", choices=["cluster", "serve"])
    ap.add_argument("--systems", default=None,
                    help="e.g. cluster,litserve-fast: each system's CPU per process and per stage (py-spy), side by "
                         "side; the others frozen while one is measured")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (with --systems)")
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
    command = " ".join(["python -m bench breakdown"] + sys.argv[1:])
    if args.systems:
        names = [n for n in args.systems.split(",") if n]
        bad = [n for n in names if n not in SYSTEMS or n in ("ceiling", "baseline")]
        if bad:
            raise SystemExit(f"breakdown cannot explain {bad}: one of serve, serve-exact, cluster, litserve, "
                             "litserve-fast")
        setup = setup_from(args, extra, log_dir=out / "logs")
        try:
            up = {n: start(n, setup) for n in names}
            explained = []
            for n in names:
                with frozen([s.proc.pid for m, s in up.items() if m != n and s.proc is not None]) as others_cpu:
                    e = explain(up[n], workload, args)
                    e["others_cpu_s"] = others_cpu()
                explained.append(e)
        finally:
            stop_all()
        meta = {"command": command, "images": args.images or "easy-VQA test split", "workload": workload.name,
                "image_mp": mean_megapixels(workload.pictures), "concurrency": args.concurrency,
                "requests": args.requests, "cores": os.cpu_count()}
        (out / "breakdown.json").write_text(json.dumps({**meta, "systems": explained}, indent=2) + "\n")
        md = side_by_side(explained, command)
        (out / "breakdown.md").write_text(md)
        print(md)
        return
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
    (out / "breakdown.json").write_text(json.dumps({**p, "command": command}, indent=2) + "\n")
    (out / "breakdown.md").write_text(markdown(p, command))
    print(markdown(p, command))


if __name__ == "__main__":
    main()
