"""Memory under load is bounded: a soak through a real cluster (HAProxy + 2 workers on the demo model) in which no
worker restarts (a restart would hide a leak), every upload new to the server (stamped: each one decoded, the
image cache full and turning over), the resident memory of each process sampled. A leak of 64 KiB per upload
(TESTS_LEAK_BYTES=65536, injected by vqa_async/testing/faults/sitecustomize.py) grows each worker by about
75 MiB over the soak, and fails it."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lib.loadgen import easy_vqa_requests, run_load
from bench.lib.workloads import STAMP
from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.testing.http import Form, multipart
from vqa_async.testing.launch import Faults, start_cluster

pytestmark = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")

WARM_UP = 1400  # > 2 x 512: both workers' image caches (512 entries each) full before the first sample
SOAK = 2400  # about 1,200 uploads per worker: 75 MiB at 64 KiB each
# Measured on the shared 2-core box (the test prints it): workers grew 7.6 and 6.1 MiB over the soak, HAProxy and
# the supervisor 0.0 (HAProxy peaked 13 MiB above its start, buffering uploads). About 3x that; a 64 KiB-per-upload
# leak adds ~75 MiB per worker.
WORKER_GROWTH_MIB = 24
OTHER_GROWTH_MIB = 8  # HAProxy and the supervisor, at the end
PEAK_MIB = 48  # any process, at any sample


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def stamped(n: int) -> Iterator[Form]:
    """n requests, each image's bytes new to the server (a trailer after the image's end: the same pixels)."""
    for image, question in easy_vqa_requests(n):
        yield multipart(STAMP(image), [question])


def test_memory_of_every_process_stays_bounded_over_a_soak_without_restarts(tmp_path: Path, demo_dir: Path) -> None:
    leak = int(os.environ.get("TESTS_LEAK_BYTES") or 0)
    cl = start_cluster(demo_dir, faults=Faults(tmp_path / "faults.json", leak_bytes=leak), home=tmp_path)
    try:
        url = cl.url + "/v1/vqa"
        warm = asyncio.run(run_load(url, stamped(WARM_UP), concurrency=16))
        assert [r.status for r in warm] == [200] * WARM_UP
        state = cl.state()
        procs = {w["name"]: w["pid"] for w in state["workers"]}
        procs |= {"haproxy": state["haproxy_pid"], "supervisor": cl.proc.pid}
        before = {name: rss_mib(pid) for name, pid in procs.items()}
        peak = dict(before)
        stop = threading.Event()

        def sample() -> None:  # every 0.2 s: the peak, not only the end
            while not stop.wait(0.2):
                for name, pid in procs.items():
                    peak[name] = max(peak[name], rss_mib(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            soak = asyncio.run(run_load(url, stamped(SOAK), concurrency=16))
        finally:
            stop.set()
            sampler.join()
        after = {name: rss_mib(pid) for name, pid in procs.items()}
        assert [r.status for r in soak] == [200] * SOAK
        # No restart: the same processes from the first sample to the last.
        assert {w["name"]: w["pid"] for w in cl.state()["workers"]} == {k: v for k, v in procs.items()
                                                                       if k.startswith("w")}
        growth = {name: round(after[name] - before[name], 1) for name in procs}
        print(f"\nRSS MiB before {before}\nafter {after}\npeak {peak}\ngrowth {growth} (leak {leak} B/upload)")
        for name in procs:
            bound = WORKER_GROWTH_MIB if name.startswith("w") else OTHER_GROWTH_MIB
            assert growth[name] <= bound, (name, growth)
            assert peak[name] - before[name] <= PEAK_MIB, (name, peak, before)
    finally:
        assert cl.stop() == 0
