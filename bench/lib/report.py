"""The bench's one report writer: repeats folded into rows (median, min, max), ratios per repeat, the judge of
the issue's targets, and DIR/results.json, DIR/results.md, DIR/plot.png.

The judge never judges a target on a row whose servers counted cache hits or per-batch dedups unless its
workload is `follow-up` (the cache's own case), and judges targets on the `distinct` workload only.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
# Summed over the repeats (None where a system does not count it); everything else numeric is the median.
SUMMED = ("requests", "failures", "cache_hits", "cache_misses", "dedups", "model_calls", "failed_model_calls",
          "preemptions", "deadline_drops", "vision_images", "follow_ups_by_image_id", "follow_ups_reuploaded")
KEYS = ("system", "concurrency")
RATIOS = (("serve", "baseline"), ("cluster", "baseline"), ("cluster", "ceiling"), ("serve", "ceiling"),
          ("serve", "litserve"), ("cluster", "litserve"), ("serve", "litserve-fast"), ("cluster", "litserve-fast"),
          ("serve-exact", "litserve"),
          ("serve", "serve-exact"), ("litserve-fast", "litserve"))
CACHE_NOTE = ("A target is never judged on a row whose servers counted cache hits or per-batch dedups unless its "
              "workload is `follow-up`; targets are judged on the `distinct` workload.")


def fold(runs: list[Row], keys: Iterable[str] = KEYS) -> list[Row]:
    """Per-repeat rows (each with `repeat`) -> one row per key: the median of every measured figure, with
    `answers_per_s_min`/`_max` and `p95_ms_min`/`_max`, counts summed over the repeats, `repeats` their number,
    and `runs` the per-repeat answers/s and P95."""
    keys = tuple(keys)
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for group in groups.values():
        row: Row = {}
        for name in dict.fromkeys(k for r in group for k in r):
            vals = [r.get(name) for r in group]
            if name in keys or name == "repeat":
                continue
            if name in SUMMED:
                row[name] = None if any(v is None for v in vals) else sum(vals)
            elif name == "failed_by_status":
                total: Counter[str] = Counter()
                for v in vals:
                    total.update(v or {})
                row[name] = dict(sorted(total.items()))
            elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
                row[name] = round(statistics.median(vals), 2)
            else:
                row[name] = vals[0]
        for name in ("answers_per_s", "p95_ms"):
            vals = [r[name] for r in group if r.get(name) is not None]
            if vals:
                row[f"{name}_min"], row[f"{name}_max"] = min(vals), max(vals)
        others = [r["others_cpu_s"] for r in group if r.get("others_cpu_s") is not None]
        if others:  # the CPU the other (frozen) systems used during the row: the worst repeat
            row["others_cpu_s_max"] = max(others)
        row["repeats"] = len(group)
        row["runs"] = [{"repeat": r.get("repeat"), "answers_per_s": r["answers_per_s"], "p95_ms": r.get("p95_ms")}
                       for r in group]
        out.append({**{k: group[0][k] for k in keys}, **row})
    return out


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def text(s: dict[str, float] | None, digits: int = 2) -> str:
    return "–" if s is None else f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def ratios(runs: list[Row], pairs: Iterable[tuple[str, str]] = RATIOS, key: str = "system") -> dict[str, Any]:
    """answers/s of num over den, computed within each repeat at each concurrency, as median [min–max]:
    {"num/den": {concurrency: spread}}."""
    by = {(r[key], r["concurrency"], r.get("repeat")): r for r in runs}
    out: dict[str, Any] = {}
    for num, den in pairs:
        per_level: dict[int, Any] = {}
        for (name, c, rep), a in by.items():
            b = by.get((den, c, rep))
            if name == num and b and b["answers_per_s"]:
                per_level.setdefault(c, []).append(a["answers_per_s"] / b["answers_per_s"])
        if per_level:
            out[f"{num}/{den}"] = {c: spread(v) for c, v in sorted(per_level.items())}
    return out


def cached(row: Row) -> bool:
    """The servers counted cache hits or per-batch dedups during the row."""
    return bool(row.get("cache_hits")) or bool(row.get("dedups"))


def judge(rows: list[Row], rat: dict[str, Any], device: str) -> list[str]:
    """The issue's targets that this run has the rows for: one line each, met or not, with the figure; or why a
    target was not judged. CPU (demo model, distinct, concurrency 32): serve >= 3x baseline; cluster >= 1.2x
    LitServe with the lower P95; cluster >= 0.85x ceiling; on photos serve >= 2x LitServe decoding every pixel.
    GPU: >= 300 answers/s through HAProxy at concurrency 128 with P95 <= 1 s and no failures; idle P50 <= 60 ms."""
    by = {(r["system"], r["concurrency"]): r for r in rows}
    out: list[str] = []

    def line(ok: bool, msg: str) -> None:
        out.append(f"{'met' if ok else 'NOT met'}: {msg}")

    def usable(*keys: tuple[str, int]) -> bool:
        got = [by[k] for k in keys if k in by]
        if len(got) < len(keys):
            return False
        for r in got:
            if r.get("workload", "distinct") != "distinct":
                out.append(f"not judged: {r['system']} c={r['concurrency']} ran the `{r['workload']}` workload "
                           "(targets are judged on `distinct`)")
                return False
            if cached(r):
                out.append(f"not judged: {r['system']} c={r['concurrency']} counted {r.get('cache_hits')} cache "
                           f"hits and {r.get('dedups')} dedups on `{r.get('workload')}`")
                return False
        return True

    def ratio(num: str, den: str, c: int) -> dict[str, float] | None:
        return (rat.get(f"{num}/{den}") or {}).get(c)

    photos = any(r.get("images") == "photos" for r in rows)
    if device == "cpu":
        targets = [("serve", "baseline", 3.0, False, 32), ("cluster", "ceiling", 0.85, False, 32)]
        targets += ([("serve", "litserve", 2.0, True, 32), ("cluster", "litserve-fast", 1.2, True, 32)] if photos
                    else [("cluster", "litserve", 1.2, True, 32), ("cluster", "litserve", 1.1, False, 8)])
        for num, den, need, p95, c in targets:
            if (num, c) not in by or (den, c) not in by or not usable((num, c), (den, c)):
                continue
            r = ratio(num, den, c)
            if r is None:
                continue
            a, b = by[(num, c)], by[(den, c)]
            ok = r["median"] >= need and (not p95 or a["p95_ms"] < b["p95_ms"])
            extra = f", P95 {a['p95_ms']} vs {b['p95_ms']} ms (target: lower)" if p95 else ""
            line(ok, f"{num}/{den} at concurrency {c} is {text(r)} (median [min–max] of {r['n']} repeats; target "
                     f">= {need}){extra}")
    else:
        if usable(("cluster", 128)):
            top = by[("cluster", 128)]
            line(top["answers_per_s"] >= 300 and top["p95_ms"] <= 1000 and top["failures"] == 0,
                 f"cluster at concurrency 128: {top['answers_per_s']} answers/s, P95 {top['p95_ms']} ms, "
                 f"{top['failures']} failures (target >= 300/s, P95 <= 1000 ms, none)")
        for name in ("cluster", "serve"):
            if usable((name, 1)):
                idle = by[(name, 1)]
                line(idle["p50_ms"] <= 60, f"{name} idle latency (concurrency 1) P50 {idle['p50_ms']} ms, P95 "
                     f"{idle['p95_ms']} ms (target P50 <= 60 ms)")
    return out


def _num(v: Any) -> str:
    return "–" if v is None else str(v)


def markdown(rows: list[Row], rat: dict[str, Any], meta: dict[str, Any], targets: list[str]) -> str:
    levels = sorted({r["concurrency"] for r in rows})
    lines = [f"# vqa-async bench — {meta['date']}", "",
             f"commit {meta.get('commit', '?')}, model `{meta['model']}`, device {meta['device']}, workload "
             f"`{meta['workload']}`, images {meta['images']} (mean {meta.get('image_mp', '?')} MP), "
             f"{meta['requests']} requests per row, {meta['repeats']} repeats (systems interleaved in each), "
             f"torch threads {meta['threads']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}, machine: {meta['machine']}",
             "", f"command: `{meta['command']}`", "",
             "Every upload carries a trailer no other request of the run carries (the pixels are unchanged): the "
             "servers' cache hits, misses and per-batch dedups below are what they counted during each row. "
             "Baseline and LitServe have no cache (–). " + (
                 "While one system was measured every other was frozen (SIGSTOP); the last column is the CPU "
                 "they used during the row (the worst repeat), ~0." if meta.get("frozen_others") else
                 "The other systems ran (idle) while each was measured (`--no-freeze`)."), "",
             "| system | concurrency | answers/s median [min–max] | P50 ms | P95 ms | P99 ms | failures | cache hits "
             "| misses | dedups | mean batch | upload CPU ms/answer | CPU ms/answer, all its processes | others' CPU s "
             "(max) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    http = [r for r in rows if not r.get("model_only")]
    model = [r for r in rows if r.get("model_only")]
    for r in http:
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['answers_per_s']} [{r['answers_per_s_min']}–"
                     f"{r['answers_per_s_max']}] | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['failures']} | "
                     f"{_num(r.get('cache_hits'))} | {_num(r.get('cache_misses'))} | {_num(r.get('dedups'))} | "
                     f"{_num(r.get('mean_batch_size'))} | {_num(r.get('cpu_ms_per_image'))} | "
                     f"{_num(r.get('cpu_ms_per_answer'))} | {_num(r.get('others_cpu_s_max'))} |")
    if model:
        lines += ["", "Model-only (`ceiling`: the bare model in the bench's process on pre-processed pixels, every "
                  "question about its own image, no HTTP; compute time is per model call):", "",
                  "| system | concurrency | answers/s median [min–max] | failures | counted mean batch | model calls "
                  "| compute P50 ms | compute P95 ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in model:
            lines.append(f"| {r['system']} (model-only) | {r['concurrency']} | {r['answers_per_s']} "
                         f"[{r['answers_per_s_min']}–{r['answers_per_s_max']}] | {r['failures']} | "
                         f"{r['mean_batch_size']} | {r['model_calls']} | {_num(r.get('compute_p50_ms'))} | "
                         f"{_num(r.get('compute_p95_ms'))} |")
    failed = [f"{r['system']} c={r['concurrency']}: {r['failed_model_calls']}" for r in rows
              if r.get("failed_model_calls")]
    if failed:
        lines += ["", "Model calls that failed and were split (out of memory also halves the batch cap, so these rows "
                  "read low): " + ", ".join(failed)]
    if rat:
        lines += ["", "Ratios of answers/s, computed within each repeat: median [min–max].", "",
                  "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |",
                  "| --- | " + " | ".join("---:" for _ in levels) + " |"]
        for name, per in rat.items():
            lines.append(f"| {name} | " + " | ".join(text(per.get(c)) for c in levels) + " |")
    hits = [r for r in http if r.get("cache_hits") is not None]
    if hits:
        bad = [f"{r['system']} c={r['concurrency']}: {r['cache_hits']} hits, {r['dedups']} dedups" for r in hits
               if cached(r)]
        lines += ["", "Cache hits and dedups counted: " + ("0 hits and 0 dedups on every row." if not bad else
                                                           "; ".join(bad) + ".")]
    lines += ["", CACHE_NOTE]
    if targets:
        lines += ["", "Targets:", ""] + [f"- {t}" for t in targets]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    levels = sorted({r["concurrency"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r for r in rows if r["system"] == s), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in pts]
        ys = [r["answers_per_s"] for r in pts]
        err = [[y - r["answers_per_s_min"] for y, r in zip(ys, pts)], [r["answers_per_s_max"] - y
                                                                       for y, r in zip(ys, pts)]]
        label = f"{s} (model-only)" if pts[0].get("model_only") else s
        ax1.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        if not pts[0].get("model_only"):
            ax2.plot(xs, [r["p95_ms"] for r in pts], marker="o", label=s)
    for ax, t in ((ax1, "throughput (answers/s, median, min–max)"), (ax2, "P95 latency (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_formatter(NullFormatter())  # the log scale's own labels would overprint ours
        ax.set_xlabel("concurrency")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, rows: list[Row], runs: list[Row], meta: dict[str, Any], device: str) -> list[str]:
    """DIR/results.json (the rows; the per-repeat rows, ratios, targets and run details in DIR/run.json),
    DIR/results.md and DIR/plot.png. Returns the target lines."""
    rat = ratios(runs)
    targets = judge(rows, rat, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "run.json").write_text(json.dumps({"meta": meta, "ratios": rat, "targets": targets, "runs": runs},
                                             indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, rat, meta, targets))
    plot(rows, out / "plot.png", f"vqa-async bench: {Path(meta['model']).name} on {device}, `{meta['workload']}`")
    return targets
