"""many-people: N people at once, each from its own address, one question at a time about a new image.

    python -m bench many-people [--people 32] [--targets serve,cluster] [--settings fifo,default,share0]
        [--seconds 20] [--repeats 3] [--minutes M] [--model DIR] [--workers 2] [--out DIR] [any other serve flag]

Each person is a closed-loop client bound to its own loopback address (127.0.0.2, 127.0.0.3, ...): one `serve`
sees N clients by their addresses; through the cluster HAProxy passes each address on in X-Forwarded-For. Every
upload is new (the `many-people` workload). For each target (`serve`, `cluster`) and each setting it starts one
system: `fifo` (--scheduling fifo), `default` (serve's defaults), `share0` (--preempt-share 0), or
`NAME=FLAGS` (e.g. `share25=--preempt-share 0.25`). Each repeat measures every system one after another (the order
rotates), `--seconds` after a 2 s warm-up that is not counted. Reported per setting: answers/s and P95 as median
[min–max] of the repeats, failures (by status; 504 apart), and what the servers counted: preemptions, requests
dropped at their deadline, cache hits and dedups. Each setting's answers/s and P95 over fifo's are computed within
each repeat. Issue 19's targets: the default's answers/s >= 0.95x fifo's and its P95 <= 1.1x fifo's.

`--minutes M` is the soak form: one run of M minutes per system, e.g. `--people 100 --minutes 3 --targets cluster
--settings default` (issue 19: 0 failed, none dropped at its deadline). Writes DIR/results.json (one row per
system), DIR/run.json (every repeat) and DIR/results.md; the last stdout line is the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.lib import report
from bench.lib.loadgen import load, summarize
from bench.lib.metrics import counted
from bench.lib.systems import System, add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import Workload
from bench.scenarios.sweep import git_commit

SETTINGS = {"fifo": ["--scheduling", "fifo"], "default": [], "share0": ["--preempt-share", "0"]}
WARMUP_S = 2.0


def settings_from(text: str, known: dict[str, list[str]] = SETTINGS) -> dict[str, list[str]]:
    """"fifo,default,share25=--preempt-share 0.25" -> {name: serve flags}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, flags = item.partition("=")
        if flags:
            out[name] = flags.split()
        elif name in known:
            out[name] = known[name]
        else:
            raise SystemExit(f"unknown setting {name!r}: {', '.join(known)} or NAME=FLAGS")
    return out


def measure(sysm: System, workload: Workload, people: int, seconds: float) -> dict[str, Any]:
    before = counted(sysm.metrics_urls)
    start_at = time.monotonic() + WARMUP_S
    until = start_at + seconds
    # The client's timeout outlasts the server's deadline: a request the server drops is its 504, not ours.
    results = load(sysm.url + "/v1/vqa", workload.endless(), people, timeout_s=120, sources=workload.sources(people),
                   until=until, drain_s=2.0)
    row = summarize(results, seconds, window=(start_at, until))
    delta = counted(sysm.metrics_urls) - before
    row.update(delta.row(sum(r.answers for r in results if r.status == 200)))
    row["http_504"] = row["failed_by_status"].get("504", 0)
    row["people_seen"] = len({r.client for r in results})
    return row


def judge(rows: list[dict[str, Any]], rat: dict[str, Any], minutes: float | None) -> list[str]:
    out = []
    for r in rows:
        if r.get("cache_hits") or r.get("dedups"):
            out.append(f"not judged: {r['system']} counted {r['cache_hits']} cache hits and {r['dedups']} dedups")
    if minutes:
        for r in rows:
            if r["setting"] == "default":
                ok = r["failures"] == 0 and r["deadline_drops"] == 0
                out.append(f"{'met' if ok else 'NOT met'}: {r['system']}, {r['concurrency']} people for {minutes:g} "
                           f"minutes: {r['failures']} failed ({r['http_504']} with 504), {r['deadline_drops']} "
                           f"dropped at their deadline (target: none)")
        return out
    for target in dict.fromkeys(r["target"] for r in rows):
        rate = rat.get(f"{target} default/{target} fifo", {}).get("answers_per_s")
        p95 = rat.get(f"{target} default/{target} fifo", {}).get("p95_ms")
        if rate and p95:
            ok = rate["median"] >= 0.95 and p95["median"] <= 1.1
            out.append(f"{'met' if ok else 'NOT met'}: {target} default/fifo answers/s {report.text(rate)}, P95 "
                       f"{report.text(p95)} (median [min–max] of {rate['n']} repeats; target >= 0.95 and <= 1.1)")
    return out


def per_repeat_ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each setting over fifo on the same target, within each repeat: answers/s and P95."""
    by = {(r["system"], r["repeat"]): r for r in runs}
    out: dict[str, Any] = {}
    for (name, rep), r in by.items():
        fifo = by.get((f"{r['target']} fifo", rep))
        if fifo is None or name == fifo["system"]:
            continue
        for key in ("answers_per_s", "p95_ms"):
            if fifo[key]:
                out.setdefault(f"{name}/{fifo['system']}", {}).setdefault(key, []).append(r[key] / fifo[key])
    return {k: {m: report.spread(v) for m, v in per.items()} for k, per in out.items()}


def markdown(rows: list[dict[str, Any]], rat: dict[str, Any], meta: dict[str, Any], targets: list[str]) -> str:
    lines = [f"# many people — {meta['date']}", "",
             f"commit {meta['commit']}, model `{meta['model']}`, {meta['people']} people (each its own address, one "
             f"question at a time, every upload new), {meta['seconds']} s per run, {meta['repeats']} repeats "
             f"(systems interleaved), machine: {meta['machine']}", "", f"command: `{meta['command']}`", "",
             "| system | answers/s median [min–max] | P50 ms | P95 ms [min–max] | failures | 504 | dropped at "
             "deadline | preemptions | model calls | mean batch | cache hits | dedups |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['answers_per_s']} [{r['answers_per_s_min']}–{r['answers_per_s_max']}] | "
                     f"{r['p50_ms']} | {r['p95_ms']} [{r['p95_ms_min']}–{r['p95_ms_max']}] | {r['failures']} | "
                     f"{r['http_504']} | {r['deadline_drops']} | {r['preemptions']} | {r['model_calls']} | "
                     f"{r['mean_batch_size']} | {r['cache_hits']} | {r['dedups']} |")
    if rat:
        lines += ["", "Over fifo on the same target, within each repeat: median [min–max].", "",
                  "| ratio | answers/s | P95 |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {report.text(v.get('answers_per_s'))} | {report.text(v.get('p95_ms'))} |"
                  for k, v in rat.items()]
    lines += ["", report.CACHE_NOTE]
    if targets:
        lines += ["", "Targets (issue 19):", ""] + [f"- {t}" for t in targets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench many-people", description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=32)
    ap.add_argument("--targets", default="serve,cluster")
    ap.add_argument("--settings", default="fifo,default,share0", help="fifo, default, share0, or NAME=FLAGS")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=None, help="the soak form: one run of this many minutes each")
    ap.add_argument("--images", default=None, help="`photos` or a folder (default: easy-VQA)")
    ap.add_argument("--out", default="bench/out-many-people")
    add_setup_arguments(ap)
    args, extra = ap.parse_known_args(argv)
    if extra and not extra[0].startswith("--"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    seconds, repeats = (args.minutes * 60, 1) if args.minutes else (args.seconds, args.repeats)
    targets = [t for t in args.targets.split(",") if t]
    settings = settings_from(args.settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = setup_from(args, extra, log_dir=out / "logs")
    workload = Workload("many-people", args.images)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: list[dict[str, Any]] = []
    try:
        up = {}
        for target in targets:
            for name, flags in settings.items():
                label = f"{target} {name}"
                print(f"starting {label} ({' '.join(flags) or 'defaults'})", file=sys.stderr, flush=True)
                up[label] = (target, name, start(target, setup, flags, label=label))
        labels = list(up)
        for rep in range(repeats):
            for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
                target, name, sysm = up[label]
                row = measure(sysm, workload, args.people, seconds)
                print(f"repeat {rep + 1} {label}: {row['answers_per_s']} answers/s, P95 {row['p95_ms']} ms, "
                      f"{row['failures']} failed, {row['preemptions']} preemptions", file=sys.stderr, flush=True)
                runs.append({"system": label, "concurrency": args.people, "repeat": rep, "target": target,
                             "setting": name, "flags": " ".join(settings[name]), "workload": "many-people", **row})
    finally:
        stop_all()
    rows = report.fold(runs)
    rat = per_repeat_ratios(runs)
    verdicts = judge(rows, rat, args.minutes)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": git_commit(), "model": args.model or "vqa_async/demo",
            "people": args.people, "seconds": seconds, "repeats": repeats,
            "machine": f"{os.cpu_count()} cores",
            "command": " ".join(["python -m bench many-people"] + sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "run.json").write_text(json.dumps({"meta": meta, "ratios": rat, "targets": verdicts, "runs": runs},
                                             indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, rat, meta, verdicts))
    for v in verdicts:
        print("target " + v, file=sys.stderr)
    print(json.dumps(rows))
