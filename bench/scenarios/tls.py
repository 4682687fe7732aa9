"""TLS at the cluster's front: P95 over https vs plain http, the same load, the same cluster flags.

    python -m bench tls [--concurrency 32] [--requests 2000] [--rounds 5] [--workers 2] [any other cluster flag]

Starts two clusters with the same flags (bench.lib.systems; demo model unless --model), one with
`--tls-cert/--tls-key` (a self-signed pair made here with openssl), and sends the same kind of closed-loop load
(the `distinct` workload: easy-VQA images, every upload new, one question each, keep-alive HTTP/1.1 connections)
to each in alternating rounds, so that the box's drift hits both alike. Target (issue 13): P95 over https within
15 % of plain http at concurrency 32. The last line is JSON: {"concurrency", "requests", "http_p95_ms",
"https_p95_ms", "ratio", "http_answers_per_s", "https_answers_per_s", "failures"}.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path

from bench.lib.certs import self_signed_cert
from bench.lib.loadgen import Result, load, percentile
from bench.lib.systems import add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import Workload


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench tls", description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2000, help="per round and scheme")
    ap.add_argument("--rounds", type=int, default=5)
    add_setup_arguments(ap)
    args, extra = ap.parse_known_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="vqa-bench-tls-"))
    cert, key = self_signed_cert(tmp, "bench")
    ctx = ssl.create_default_context(cafile=str(cert))
    setup = setup_from(args, extra, log_dir=tmp)
    workload = Workload("distinct")
    try:
        urls = {"http": start("cluster", setup, label="http").url,
                "https": start("cluster", setup, ["--tls-cert", str(cert), "--tls-key", str(key)], label="https",
                               ssl_context=ctx).url}
        tls = {"http": None, "https": ctx}
        results: dict[str, list[Result]] = {"http": [], "https": []}
        walls = {"http": 0.0, "https": 0.0}
        for scheme, url in urls.items():  # warm-up: connections, first batches
            load(url + "/v1/vqa", workload.jobs(200), args.concurrency, ssl_context=tls[scheme])
        for r in range(args.rounds):
            for scheme in (("http", "https") if r % 2 == 0 else ("https", "http")):
                jobs = workload.jobs(args.requests)
                t0 = time.monotonic()
                results[scheme] += load(urls[scheme] + "/v1/vqa", jobs, args.concurrency, ssl_context=tls[scheme])
                walls[scheme] += time.monotonic() - t0
    finally:
        stop_all()
    out: dict[str, object] = {"concurrency": args.concurrency, "requests": args.requests * args.rounds}
    for scheme, res in results.items():
        ok = sorted(x.latency_s * 1000 for x in res if x.status == 200) or [0.0]
        out[f"{scheme}_p95_ms"] = percentile(ok, 95)
        out[f"{scheme}_answers_per_s"] = round(sum(x.status == 200 for x in res) / walls[scheme], 1)
    http_p95 = float(out["http_p95_ms"])  # type: ignore[arg-type]
    out["ratio"] = round(float(out["https_p95_ms"]) / http_p95, 3) if http_p95 else None  # type: ignore[arg-type]
    out["failures"] = sum(x.status != 200 for res in results.values() for x in res)
    print(f"P95 https/http at concurrency {args.concurrency}: {out['ratio']} (target <= 1.15)", file=sys.stderr)
    print(json.dumps(out))
