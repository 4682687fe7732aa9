"""The bench: `python -m bench SCENARIO [flags]` (from the repository root); `python -m bench SCENARIO --help`.

Every scenario starts what it measures itself (bench.lib.systems), drives it with one load generator
(bench.lib.loadgen) on named workloads whose uploads no server has seen (bench.lib.workloads), reads what the
servers counted (bench.lib.metrics) and writes its report (bench.lib.report, or one JSON line last).
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module in bench.scenarios, the question it answers)
SCENARIOS = {
    "sweep": ("sweep", "systems side by side over concurrency, on a workload, repeated (the comparisons)"),
    "ablation": ("ablation", "what each part is worth: batching, the fast decoder, the upload path, the cache"),
    "many-people": ("many_people", "N people from N addresses: fifo vs the default vs --preempt-share 0"),
    "fairness": ("fairness", "a bulk client beside a closed-loop light one (fair vs fifo)"),
    "fairness-replay": ("fairness_replay", "the fairness workload replayed on the measured batch cost"),
    "page-user": ("page_user", "a person on the page beside a bulk client, per --preempt-share"),
    "breakdown": ("breakdown", "where the CPU time goes, by stage and process"),
    "chaos": ("chaos", "the cluster under load while workers are killed, stalled and reloaded"),
    "batch-job": ("batch_job", "vqa-async batch vs the bench's load generator on the same load (answers/s)"),
    "tls": ("tls", "P95 over https vs http at the cluster's front"),
    "tracing": ("tracing", "answers/s with OpenTelemetry tracing off vs on (exporting over OTLP)"),
    "http-floor": ("http_floor", "CPU per request of HTTP and upload parsing alone, no model"),
    "many-parts": ("many_parts", "how fast serve refuses a form of 160,000 parts"),
    "flops": ("flops", "FLOPs per answer counted on the model, and MFU of a sweep's rows"),
    "decoder": ("decoder", "the reference vs the fast decoder on the same questions"),
    "upload-cpu": ("upload_cpu", "CPU per photo from bytes to pixels, exact vs fast"),
    "photos": ("photos", "build the phone-like photo set"),
    "checkpoint": ("checkpoint", "write a ModelScope-format mPLUG checkpoint (random weights)"),
}


def usage() -> str:
    width = max(map(len, SCENARIOS))
    return (__doc__ or "") + "\nScenarios:\n" + "\n".join(f"  {k:{width}s}  {v[1]}" for k, v in SCENARIOS.items())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SCENARIOS:
        print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    # Before anything loads torch (the ceiling runs in this process): the policy every system gets.
    policy = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--omp-wait-policy"), "PASSIVE")
    os.environ.setdefault("OMP_WAIT_POLICY", policy)
    name = "bench.lib.photos" if argv[0] == "photos" else f"bench.scenarios.{SCENARIOS[argv[0]][0]}"
    module = importlib.import_module(name)
    sys.argv = [f"python -m bench {argv[0]}", *argv[1:]]
    sys.exit(module.main(argv[1:]))


if __name__ == "__main__":
    main()
