"""The fair bench (other systems frozen while one is measured) and the profiled breakdown (issue 26)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bench import bench

from bench.lib.freeze import frozen, proc_cpu, tree
from bench.lib.profiler import classify, parse_raw, py_spy, split
from vqa_async.cluster.haproxy import find_haproxy

ROOT = Path(__file__).resolve().parents[2]
BUSY = "import os\nif os.fork() == 0:\n    while True: pass\nwhile True: pass\n"  # a parent and a child, both busy


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_frozen_stops_a_whole_process_tree_and_measures_that_it_used_no_cpu() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        deadline = time.monotonic() + 10
        while len(tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = tree(proc.pid)
        assert len(pids) == 2 and pids[0] == proc.pid
        time.sleep(0.3)
        with frozen([proc.pid]) as others_cpu:
            assert {state(p) for p in pids} == {"T"}
            time.sleep(1.0)
            assert others_cpu() <= 0.02  # busy, they would have used ~2 s in that second
        time.sleep(0.5)  # thawed: they burn CPU again
        assert {state(p) for p in pids} <= {"R", "S"}
        before = sum(proc_cpu(p) for p in pids)
        time.sleep(0.5)
        assert sum(proc_cpu(p) for p in pids) > before
    finally:
        for p in reversed(tree(proc.pid)):
            subprocess.run(["kill", "-9", str(p)], check=False)
        proc.wait()


def test_the_profiler_puts_each_stack_in_its_stage() -> None:
    f = "{} ({}:1)".format
    loop = f("run_forever", "/usr/lib/python3.12/asyncio/base_events.py")
    assert classify(";".join([loop, f("data_received", "/x/aiohttp/web_protocol.py")])) == "HTTP read+parse"
    assert classify(";".join([loop, f("metrics_middleware", "/r/vqa_async/http/handlers.py"),
                              f("vqa_v1", "/r/vqa_async/http/handlers.py"),
                              f("_from_multipart", "/r/vqa_async/http/parse.py"),
                              f("read", "/x/aiohttp/multipart.py")])) == "HTTP read+parse"
    assert classify(";".join([f("_worker", "/usr/lib/python3.12/concurrent/futures/thread.py"),
                              f("_prepare", "/r/vqa_async/core/service.py"),
                              f("decode", "/r/vqa_async/model/preprocess.py"),
                              f("open", "/x/PIL/Image.py")])) == "decode"
    assert classify(";".join([f("_run_batch", "/r/vqa_async/batching/runner.py"),
                              f("run", "/r/vqa_async/core/adapter.py"),
                              f("forward", "/x/torch/nn/modules/linear.py")])) == "model"
    assert classify(";".join([f("_run_batch", "/r/vqa_async/batching/runner.py"),
                              f("_settle_all", "/r/vqa_async/batching/runner.py")])) == "queue+collector"
    assert classify(";".join([f("decode_request", "/r/bench/litserve_vqa.py"),
                              f("pixels", "/r/vqa_async/model/preprocess.py")])) == "preprocess"
    assert classify(";".join([f("run", "/x/litserve/loops/simple_loops.py"),
                              f("get", "/usr/lib/python3.12/multiprocessing/queues.py")])) == "queue+collector"
    assert classify(loop) == "event loop, other"
    # uvloop runs the loop in C: the deepest Python frame is the server's run(), ours or uvicorn's: the loop.
    assert classify(f("run", "/r/vqa_async/http/server.py")) == "event loop, other"
    assert classify(";".join([f("run", "/x/uvicorn/server.py"), f("serve", "/x/uvicorn/server.py")])) == \
        "event loop, other"
    raw = f"thread (12): MainThread;{loop};{f('inc', '/x/prometheus_client/metrics.py')} 7\nthread (12);{loop} 3\n"
    raw += f"thread (13);{f('run', '/r/vqa_async/core/adapter.py')} 4\n"
    got = parse_raw(raw)
    assert got == {12: {"middlewares+metrics": 7, "event loop, other": 3}, 13: {"model": 4}}
    # Each thread's measured CPU is split by its own samples; a thread that was never sampled is "other".
    assert split({12: 1.0, 13: 2.0, 14: 0.5}, got) == {"middlewares+metrics": 0.7, "event loop, other": 0.8,
                                                        "model": 2.0}


@pytest.mark.skipif(find_haproxy() is None or py_spy() is None, reason="needs Debian's haproxy and py-spy")
def test_breakdown_explains_both_systems_side_by_side_with_the_others_frozen(tmp_path: Path) -> None:
    out = tmp_path / "bd"
    bench("breakdown", "--systems", "cluster,litserve-fast", "--concurrency", "8", "--requests", "96",
          "--torch-threads", "1", "--out", str(out))
    p = json.loads((out / "breakdown.json").read_text())
    by = {s["system"]: s for s in p["systems"]}
    assert list(by) == ["cluster", "litserve-fast"]
    for s in by.values():
        assert s["answers"] == 96 and s["total_ms_per_answer"] > 0
        assert s["others_cpu_s"] <= 0.05, s["others_cpu_s"]  # the other system was frozen
        assert s["stages_ms_per_answer"]["model"] > 0  # sampled: the model shows in both
        assert abs(sum(s["stages_ms_per_answer"].values()) - s["total_ms_per_answer"]) < 0.01
        assert sum(pr["samples"] for pr in s["processes"]) > 0
    procs = {pr["process"] for pr in by["cluster"]["processes"]}
    assert {"supervisor", "HAProxy", "worker 1", "worker 2"} <= procs
    assert by["cluster"]["stages_ms_per_answer"]["proxy"] > 0
    assert by["litserve-fast"]["stages_ms_per_answer"]["proxy"] == 0
    md = (out / "breakdown.md").read_text()
    assert "| stage | cluster | litserve-fast |" in md and "What `cluster` pays that `litserve-fast`" in md
    assert any((out / "pyspy" / "cluster").glob("*.txt"))


def test_upload_cpu_through_serve_reports_the_cpu_outside_the_model() -> None:
    """The 12 MP target is judged through a real serve (HTTP, hash, decode, resize, bookkeeping), not in-process:
    here small, on the demo model and the 0.3 MP photos."""
    done = bench("upload-cpu", "--through-serve", "--model", str(ROOT / "vqa_async" / "demo"), "--size", "0.3mp",
                 "--n", "4")
    got = json.loads(done.strip().splitlines()[-1])
    assert got["size"] == "0.3mp" and got["n"] == 4
    assert got["decode_ms"] > 0 and got["model_ms"] > 0
    assert got["process_ms"] >= got["outside_model_ms"] >= got["decode_ms"]
    assert "through serve" in done
