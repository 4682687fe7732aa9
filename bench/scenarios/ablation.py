"""ablation: what each part of `serve` is worth, one step at a time, on uploads no server has seen.

    python -m bench ablation [--concurrency 32] [--requests 600] [--repeats 3] [--model DIR]
        [--photo-model DIR] [--steps all] [--out DIR] [any other serve flag]

Every step is one `serve` (bench.lib.systems: the same threads and OMP_WAIT_POLICY), measured at one concurrency;
each repeat measures every step one after another (the order rotates), and each step's gain over the one before is
computed within each repeat, reported as median [min–max]. While one step is measured the others' servers are
frozen (SIGSTOP; each row records the CPU they used meanwhile, `others_cpu_s`: ~0):

1. `batching`: batching alone (`--decoder reference --exact-preprocess --image-cache-entries 0`), `distinct`;
2. `fast-decoder`: + the fast decoder (`--exact-preprocess --image-cache-entries 0`), `distinct`;
3. `photos-exact`: step 2 on photos (Pillow decodes every pixel), `distinct`, then
   `fast-upload`: + the fast upload path (`--image-cache-entries 0`) on photos, `distinct`;
4. `pool-prepare`: the fast server, every upload handed to the preprocessing pool (serve's default), then
   `inline-prepare`: + uploads up to 16 KB decoded on the event loop (`--inline-prepare-kb 16`), `distinct`;
5. `follow-up-no-cache`: the fast server with the cache off (`--image-cache-entries 0`) on `follow-up`, then
   `cache`: + the embedding cache (serve's default) on `follow-up`.

(`--image-cache-entries 0` turns the cache off: nothing is stored, every image is a miss; a follow-up by image_id
then answers 409 and the load generator sends the image again, as a client does.) Photos run on `--photo-model`
(default: `--model`; mPLUG-large's 504 px input on a CPU: `vqa-async synth --preset photo504`). Writes
DIR/results.json (one row per step: the sweep's columns plus `step`, `flags`, `images`, `gain_over`, `gain`),
DIR/run.json, DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.lib import report
from bench.lib.freeze import frozen
from bench.lib.systems import add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import Workload
from bench.scenarios.sweep import git_commit, measure, others

NO_CACHE = ["--image-cache-entries", "0"]
# name -> (serve flags, workload, on photos, the step it is measured against)
STEPS: dict[str, tuple[list[str], str, bool, str | None]] = {
    "batching": (["--decoder", "reference", "--exact-preprocess", *NO_CACHE], "distinct", False, None),
    "fast-decoder": (["--exact-preprocess", *NO_CACHE], "distinct", False, "batching"),
    "photos-exact": (["--exact-preprocess", *NO_CACHE], "distinct", True, None),
    "fast-upload": (NO_CACHE, "distinct", True, "photos-exact"),
    "pool-prepare": (NO_CACHE, "distinct", False, None),
    "inline-prepare": ([*NO_CACHE, "--inline-prepare-kb", "16"], "distinct", False, "pool-prepare"),
    "follow-up-no-cache": (NO_CACHE, "follow-up", False, None),
    "cache": ([], "follow-up", False, "follow-up-no-cache"),
}
WHAT = {"batching": "batching alone (reference decoder, exact preprocessing, cache off)",
        "fast-decoder": "+ the fast decoder", "photos-exact": "the same on photos (every pixel decoded)",
        "fast-upload": "+ the fast upload path (photos)",
        "pool-prepare": "every upload decoded in the preprocessing pool (the default)",
        "inline-prepare": "+ uploads <= 16 KB decoded on the event loop (--inline-prepare-kb 16)",
        "follow-up-no-cache": "follow-up questions, cache off",
        "cache": "+ the embedding cache (follow-up)"}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# ablation — {meta['date']}", "",
             f"commit {meta['commit']}, model `{meta['model']}` (photos: `{meta['photo_model']}`), concurrency "
             f"{meta['concurrency']}, {meta['requests']} requests per row, {meta['repeats']} repeats (steps "
             "interleaved in each), every upload new", "", f"command: `{meta['command']}`", "",
             "| step | what | workload | images | answers/s median [min–max] | gain (within each repeat) | P95 ms | "
             "CPU ms per answer | failures | cache hits | misses | dedups | others' CPU s (max) | flags |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        gain = f"{report.text(r['gain'])} over {r['gain_over']}" if r.get("gain") else "–"
        lines.append(f"| {r['step']} | {WHAT[r['step']]} | {r['workload']} | {r['images']} | {r['answers_per_s']} "
                     f"[{r['answers_per_s_min']}–{r['answers_per_s_max']}] | {gain} | {r['p95_ms']} | "
                     f"{r.get('cpu_ms_per_answer', '–')} | "
                     f"{r['failures']} | {r['cache_hits']} | {r['cache_misses']} | {r['dedups']} | "
                     f"{r.get('others_cpu_s_max', '–')} | `{r['flags']}` |")
    bad = [r["step"] for r in rows if r["workload"] != "follow-up" and report.cached(r)]
    lines += ["", ("Cache hits or dedups on a `distinct` row: " + ", ".join(bad)) if bad else
              "0 cache hits and 0 dedups on every `distinct` row.", "", report.CACHE_NOTE]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench ablation", description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photo-model", default=None, help="the model of the photo steps (default: --model)")
    ap.add_argument("--steps", default="all", help=f"all, or some of {', '.join(STEPS)}")
    ap.add_argument("--out", default="bench/out-ablation")
    ap.add_argument("--no-freeze", action="store_true", help="leave the other steps' servers running meanwhile")
    add_setup_arguments(ap)
    args, extra = ap.parse_known_args(argv)
    steps = list(STEPS) if args.steps == "all" else [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}: expected {', '.join(STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = setup_from(args, extra, log_dir=out / "logs")
    photo_setup = setup_from(args, extra, log_dir=out / "logs")
    photo_setup.model = args.photo_model or args.model
    workloads = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: list[dict[str, Any]] = []
    try:
        up = {}
        for step in steps:
            flags, workload, photos, _ = STEPS[step]
            print(f"starting {step}: serve {' '.join(flags)}", file=sys.stderr, flush=True)
            up[step] = start("serve", photo_setup if photos else setup, flags, label=step)
            key = (workload, photos)
            if key not in workloads:
                workloads[key] = Workload(workload, "photos" if photos else None)
        for rep in range(args.repeats):
            for step in steps[rep % len(steps):] + steps[:rep % len(steps)]:
                flags, workload, photos, _ = STEPS[step]
                with frozen([] if args.no_freeze else others(up, step)) as others_cpu:
                    row = measure(up[step], workloads[(workload, photos)], args.concurrency, args.requests)
                    row["others_cpu_s"] = others_cpu()
                print(f"repeat {rep + 1} {step}: {row['answers_per_s']} answers/s, P95 {row['p95_ms']} ms, "
                      f"{row['cpu_ms_per_answer']} CPU ms/answer, {row['cache_hits']} hits, "
                      f"others' CPU {row['others_cpu_s']} s",
                      file=sys.stderr, flush=True)
                runs.append({"system": step, "step": step, "concurrency": args.concurrency, "repeat": rep,
                             "workload": workload, "images": "photos" if photos else "easy-vqa",
                             "flags": " ".join(flags), **row})
    finally:
        stop_all()
    rows = report.fold(runs)
    gains = report.ratios(runs, [(s, STEPS[s][3]) for s in steps if STEPS[s][3] in steps])
    for r in rows:
        before = STEPS[r["step"]][3]
        r["gain_over"] = before if before in steps else None
        r["gain"] = (gains.get(f"{r['step']}/{before}") or {}).get(args.concurrency)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "model": args.model or "vqa_async/demo",
            "photo_model": photo_setup.model or "vqa_async/demo", "concurrency": args.concurrency,
            "requests": args.requests, "repeats": args.repeats,
            "command": " ".join(["python -m bench ablation"] + sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "run.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, meta))
    for r in rows:
        print(f"{r['step']:20s} {r['answers_per_s']:8.2f} answers/s  gain {report.text(r['gain'])}  hits "
              f"{r['cache_hits']}")
    print(f"wrote {out}/results.json, results.md, run.json")
