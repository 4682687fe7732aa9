"""`python -m bench chaos` for one minute: kills, stalls, reloads and bad reloads under load lose no request.
Memory is bounded elsewhere (tests/test_cluster_memory.py): chaos's reloads restart every worker, which would hide
a leak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.testing.launch import stop_process

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"requests", "failures", "kills", "stalls", "reloads", "failed_reloads", "restart_p50_s", "p99_ms",
        "in_flight_at_faults"}


@pytest.mark.timeout(900)  # a minute of chaos after a start and a first whole round, on a busy 2-core box
@pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")
def test_chaos_kill_stall_reload_under_load_loses_nothing() -> None:
    # Seed 9: kill, stall, reload, bad reload; a minute on a slow box still times one restart.
    proc = subprocess.Popen([sys.executable, "-m", "bench", "chaos", "--minutes", "1", "--seed", "9"],
                            stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=840)
    finally:  # on a timeout too: the scenario, its cluster (another session) and the cluster's children
        stop_process(proc, timeout=30)
    result = json.loads(out.decode().strip().splitlines()[-1])
    print("\n" + json.dumps(result))
    assert set(result) >= KEYS, result
    assert result["failures"] == 0 and result["problems"] == [] and result["cluster_exit"] == 0, result
    # Every kind of fault happened (the scenario's first round runs whole), each with requests in flight.
    assert min(result["kills"], result["stalls"], result["reloads"], result["failed_reloads"]) >= 1, result
    faults = result["kills"] + result["stalls"] + result["reloads"] + result["failed_reloads"]
    assert len(result["in_flight_at_faults"]) == faults and min(result["in_flight_at_faults"]) >= 1, result
    assert result["requests"] > 0 and result["restart_p50_s"] is not None
