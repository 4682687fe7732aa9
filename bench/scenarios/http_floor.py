"""The CPU floor of the HTTP path alone: the server's own request parsing and JSON reply, with no model.

    python -m bench http-floor [--requests 3000] [--concurrency 32]

It starts one aiohttp process (uvloop) whose /v1/vqa reads the upload exactly as `vqa-async serve` does
(`read_vqa_input`) and answers a constant, then drives it with the bench's load generator and prints the CPU
milliseconds per request of the server and of the load generator. Whatever a server does around the model costs
at least this much per request; `python -m bench breakdown` shows what ours costs in full.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SERVER = """
import sys, orjson, uvloop
from aiohttp import web
from vqa_async.config import Settings
from vqa_async.http.parse import read_vqa_input

settings = Settings(device="cpu")

async def vqa(request):
    vqa = await read_vqa_input(request, settings)
    return web.Response(body=orjson.dumps({"answer": "circle", "batch_size": 1}), content_type="application/json")

async def readyz(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_post("/v1/vqa", vqa)
app.router.add_get("/readyz", readyz)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=uvloop.new_event_loop())
"""


def main(argv: list[str] | None = None) -> None:
    from bench.lib.freeze import proc_cpu
    from bench.lib.loadgen import load, summarize, wait_ready
    from bench.lib.workloads import Workload, forms_of
    from vqa_async.cluster.supervisor import free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        workload = Workload("distinct")
        forms = forms_of(workload.jobs(args.requests))
        url = f"http://127.0.0.1:{port}/v1/vqa"
        load(url, workload.jobs(200), args.concurrency)
        server_before = proc_cpu(proc.pid)
        t = os.times()
        t0 = time.monotonic()
        results = load(url, forms, args.concurrency)
        wall = time.monotonic() - t0
        t2 = os.times()
        server = proc_cpu(proc.pid) - server_before
    finally:
        proc.terminate()
        proc.wait()
    s = summarize(results, wall)
    n = int(s["requests"]) - int(s["failures"])
    print(json.dumps({"requests_per_s": s["answers_per_s"], "failures": s["failures"],
                      "server_cpu_ms_per_request": round(1000 * server / n, 3),
                      "loadgen_cpu_ms_per_request": round(1000 * (t2.user + t2.system - t.user - t.system) / n, 3)}))


if __name__ == "__main__":
    main()
