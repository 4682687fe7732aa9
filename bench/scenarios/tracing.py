"""Tracing off vs on: answers/s and server CPU per answer at concurrency 32, the same flags, interleaved rounds.

    python -m bench tracing [--concurrency 32] [--requests 1000] [--rounds 6] [--system serve|cluster] [--together]
                            [--otel OTEL_TRACES_SAMPLER=traceidratio --otel OTEL_TRACES_SAMPLER_ARG=0.1]
                            [any other serve flag]
    python -m bench tracing --hooks-only

Starts two systems with the same flags (bench.lib.systems; demo model unless --model); the second has
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set to an OTLP/HTTP sink started here (a process of its own that answers every
export and counts the spans in it), so that every request is traced and exported (the SDK's default sampler,
batch processor and exporter). The same closed-loop load (the `distinct` workload: a new upload each request) goes
to each in alternating rounds (off then on, then on then off), so that the box's drift hits both alike; each
round's ratio on/off is taken from two back-to-back loads (or, with `--together`, from two loads at once, which
then share the cores). `--otel NAME=VALUE` adds an SDK variable to the traced system's environment (a sampler,
say; by default every request is traced). Target (issue 29): at most 2 % fewer
answers/s traced. The server's CPU seconds per answer (from /proc: the serve process, or the cluster's workers) are
reported too: on a shared box they move less than a rate. The last line is JSON.

`--hooks-only` measures instead, in this process and in CPU time (what a shared box disturbs least), what the
request path's tracing costs per request without a server: the hooks of one request (its server span, `read
upload`, `decode`, `queue wait`, `response`, a 16th of a batch span) off, on without export, and on with each span
encoded to OTLP protobuf as the exporter does (no network), and on for a request the sampler drops (what most
requests are under a ratio sampler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from bench.lib.loadgen import load, summarize
from bench.lib.systems import System, add_setup_arguments, setup_from, start, stop_all
from bench.lib.workloads import Workload
from bench.scenarios.breakdown import proc_cpu

SINK = """
import sys
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

spans = 0

async def traces(request):
    global spans
    req = ExportTraceServiceRequest()
    req.ParseFromString(await request.read())
    spans += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    return web.Response(body=b"", content_type="application/x-protobuf")

async def count(request):
    return web.Response(text=str(spans))

app = web.Application(client_max_size=64 * 2**20)
app.router.add_post("/v1/traces", traces)
app.router.add_get("/count", count)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def spans_received(sink_url: str) -> int:
    with urllib.request.urlopen(sink_url + "/count", timeout=5) as r:
        return int(r.read())


def server_cpu(sysm: System) -> float:
    """CPU seconds of the processes that serve: serve itself, or the cluster's workers (not HAProxy)."""
    if sysm.state is not None:
        return sum(proc_cpu(w["pid"]) for w in sysm.state["workers"])
    return proc_cpu(sysm.proc.pid if sysm.proc else None)


def hooks_cpu(n: int = 4096) -> dict[str, float]:
    """CPU microseconds per request of the tracing hooks: off, on but not sampled, on (spans made, not exported),
    on and encoded."""
    import asyncio
    from types import SimpleNamespace

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from vqa_async.otel import hooks
    from vqa_async.otel.live import LiveTracing

    class Exporter(SpanExporter):
        def __init__(self, encode: bool) -> None:
            self.encode = encode

        def export(self, spans: object) -> SpanExportResult:
            if self.encode:
                encode_spans(spans).SerializeToString()  # type: ignore[arg-type]
            return SpanExportResult.SUCCESS

    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

    async def answered() -> None:
        return None

    async def requests() -> None:
        for _ in range(n // 16):  # batches of 16 requests, the CPU default
            items, spans = [], []
            for _ in range(16):  # what tracing_middleware, parse, the service and the runner call, in order
                tracing = hooks.active()
                if tracing is not None:
                    cm = tracing.request("POST /v1/vqa", headers, {"http.request.method": "POST",
                                                                    "url.path": "/v1/vqa", "http.route": "/v1/vqa",
                                                                    "vqa.request_id": "0" * 32})
                    span = cm.__enter__()
                    spans.append((cm, span))
                await hooks.traced("read upload", answered())
                await hooks.traced("decode", answered())
                items.append(SimpleNamespace(trace=hooks.current(), enqueued_at=time.monotonic()))
            with hooks.batch(items, 16) as trace:
                pass
            for item, (cm, span) in zip(items, spans or [(None, None)] * 16):
                hooks.waited(item.enqueued_at, time.monotonic(), trace, 16)
                with hooks.span("response"):
                    pass
                if span is not None:
                    span.finish(200)
                    cm.__exit__(None, None, None)

    out = {}
    for mode in ("off", "on_not_sampled", "on", "on_encoded"):
        provider = TracerProvider(sampler=ALWAYS_OFF if mode == "on_not_sampled" else None)
        provider.add_span_processor(SimpleSpanProcessor(Exporter(encode=mode == "on_encoded")))
        hooks.install(None if mode == "off" else LiveTracing(provider))
        c0 = time.process_time()
        asyncio.run(requests())
        out[f"{mode}_cpu_us_per_request"] = round((time.process_time() - c0) / n * 1e6, 1)
    hooks.install(None)
    return out


def measure(sysm: System, workload: Workload, args: argparse.Namespace) -> dict[str, object]:
    """One closed-loop load on `sysm`: answers/s, server CPU per answer, mean batch, failures."""
    cpu0, t0 = server_cpu(sysm), time.monotonic()
    results = load(sysm.url + "/v1/vqa", workload.jobs(args.requests), args.concurrency)
    s = summarize(results, time.monotonic() - t0)
    answers = int(s["requests"]) - int(s["failures"])
    return {"answers_per_s": s["answers_per_s"], "cpu_ms_per_answer": round(
        1000 * (server_cpu(sysm) - cpu0) / max(1, answers), 3), "mean_batch": s["mean_batch_size_seen"],
        "failures": s["failures"]}


def main(argv: list[str] | None = None) -> None:
    from vqa_async.cluster.supervisor import free_port

    ap = argparse.ArgumentParser(prog="python -m bench tracing", description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000, help="per round and system")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--system", choices=["serve", "cluster"], default="serve")
    ap.add_argument("--together", action="store_true",
                    help="load both systems at once (each its own load generator): the box's drift hits both at "
                         "every instant; they then share the cores, so the ratio is one of cost per answer")
    ap.add_argument("--hooks-only", action="store_true", help="CPU per request of the hooks alone (see above)")
    ap.add_argument("--otel", action="append", default=[], metavar="NAME=VALUE",
                    help="an OTEL_* variable for the traced system (repeatable)")
    add_setup_arguments(ap)
    args, extra = ap.parse_known_args(argv)
    if args.hooks_only:
        print(json.dumps(hooks_cpu()))
        return
    setup = setup_from(args, extra)
    workload = Workload("distinct")
    port = free_port()
    sink_url = f"http://127.0.0.1:{port}"
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)], start_new_session=True)
    rounds: list[dict[str, object]] = []
    try:
        for _ in range(100):  # the sink is up
            try:
                spans_received(sink_url)
                break
            except OSError:
                time.sleep(0.1)
        systems = {"off": start(args.system, setup, label="tracing-off")}
        otel = dict(kv.split("=", 1) for kv in args.otel)
        otel["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = sink_url + "/v1/traces"
        os.environ.update(otel)
        try:  # the systems inherit the bench's environment (Setup.env)
            systems["on"] = start(args.system, setup, label="tracing-on")
        finally:
            for name in otel:
                del os.environ[name]
        for sysm in systems.values():  # warm-up: connections, first batches
            load(sysm.url + "/v1/vqa", workload.jobs(200), args.concurrency)
        for r in range(args.rounds):
            row: dict[str, object] = {"round": r + 1, "load_average": round(os.getloadavg()[0], 1)}
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            if args.together:
                with ThreadPoolExecutor(2) as pool:
                    measured = dict(zip(order, pool.map(lambda m: measure(systems[m], workload, args), order)))
            else:
                measured = {mode: measure(systems[mode], workload, args) for mode in order}
            for mode in order:
                row.update({f"{mode}_{k}": v for k, v in measured[mode].items()})
            row["ratio"] = round(float(row["on_answers_per_s"]) / float(row["off_answers_per_s"]), 4)  # type: ignore[arg-type]
            row["cpu_ratio"] = round(float(row["on_cpu_ms_per_answer"]) /  # type: ignore[arg-type]
                                     float(row["off_cpu_ms_per_answer"]), 4)  # type: ignore[arg-type]
            print(json.dumps(row), file=sys.stderr)
            rounds.append(row)
        time.sleep(1.0)  # the SDK's batch processor exports every 5 s by default: the count is a lower bound
        spans = spans_received(sink_url)
    finally:
        stop_all()
        sink.terminate()
        sink.wait()
    ratios = [float(r["ratio"]) for r in rounds]  # type: ignore[arg-type]
    cpu_ratios = [float(r["cpu_ratio"]) for r in rounds]  # type: ignore[arg-type]
    out = {"system": args.system, "concurrency": args.concurrency, "requests_per_round": args.requests,
           "otel": args.otel,
           "rounds": rounds, "ratio_median": round(statistics.median(ratios), 4),
           "ratio_min": min(ratios), "ratio_max": max(ratios),
           "cpu_ratio_median": round(statistics.median(cpu_ratios), 4), "cpu_ratio_min": min(cpu_ratios),
           "cpu_ratio_max": max(cpu_ratios), "spans_received": spans,
           "failures": sum(int(r["off_failures"]) + int(r["on_failures"]) for r in rounds)}  # type: ignore[call-overload]
    print(f"answers/s traced / untraced at concurrency {args.concurrency}: median {out['ratio_median']} "
          f"[{out['ratio_min']}-{out['ratio_max']}] (target >= 0.98)", file=sys.stderr)
    print(json.dumps(out))
