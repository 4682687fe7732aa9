"""TLS at the cluster's front: P95 over https vs plain http, the same load, the same cluster flags.

    python bench/tls.py [--concurrency 32] [--requests 2000] [--rounds 5] [--workers 2] [any other cluster flag]

Starts two clusters with the same flags (demo model unless --model is among them), one with `--tls-cert/--tls-key`
(a self-signed pair made here with openssl), and sends the same closed-loop load (easy-VQA images, one question
each, keep-alive HTTP/1.1 connections) to each in alternating rounds, so that the box's drift hits both alike.
Target (issue 13): P95 over https within 15 % of plain http at concurrency 32. The last line is JSON:
{"concurrency", "requests", "http_p95_ms", "https_p95_ms", "ratio", "http_answers_per_s", "https_answers_per_s",
 "failures"}.
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import uvloop

from vqa_async.cluster.supervisor import free_port_pair, serve_command
from vqa_async.tools.certs import self_signed_cert
from vqa_async.tools.loadgen import Result, easy_vqa_requests, encode_forms, percentile, run_load


def wait_ready(url: str, proc: subprocess.Popen[bytes], ctx: ssl.SSLContext | None, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the cluster exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2, context=ctx) as r:
                if r.status == 200:
                    time.sleep(1.5)  # HAProxy's first health checks of every worker
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2000, help="per round and scheme")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    args, extra = ap.parse_known_args()
    tmp = Path(tempfile.mkdtemp(prefix="vqa-bench-tls-"))
    cert, key = self_signed_cert(tmp, "bench")
    ctx = ssl.create_default_context(cafile=str(cert))
    procs: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    try:
        for scheme, tls in (("http", []), ("https", ["--tls-cert", str(cert), "--tls-key", str(key)])):
            port = free_port_pair()
            cmd = serve_command() + ["cluster", "--workers", str(args.workers), "--port", str(port),
                                     "--runtime-dir", str(tmp / f"rt-{scheme}"), *tls, *extra]
            log = open(tmp / f"{scheme}.log", "wb")  # noqa: SIM115 - lives as long as the process
            procs[scheme] = (f"{scheme}://127.0.0.1:{port}", subprocess.Popen(cmd, stdout=log, stderr=log))
        for scheme, (url, proc) in procs.items():
            wait_ready(url, proc, ctx if scheme == "https" else None)
        forms = encode_forms(easy_vqa_requests(args.requests))
        results: dict[str, list[Result]] = {"http": [], "https": []}
        walls = {"http": 0.0, "https": 0.0}
        for scheme, (url, _) in procs.items():  # warm-up: connections, first batches
            uvloop.run(run_load(url + "/v1/vqa", forms[:200], args.concurrency,
                                ssl_context=ctx if scheme == "https" else None))
        for r in range(args.rounds):
            for scheme in (("http", "https") if r % 2 == 0 else ("https", "http")):
                url = procs[scheme][0]
                t0 = time.monotonic()
                results[scheme] += uvloop.run(run_load(url + "/v1/vqa", forms, args.concurrency,
                                                       ssl_context=ctx if scheme == "https" else None))
                walls[scheme] += time.monotonic() - t0
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
    finally:
        for _, proc in procs.values():
            proc.terminate()
        for _, proc in procs.values():
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
