"""The bench's command lines are a contract others script against: run them small, check what they write, and
that they leave no process behind. (The figures themselves are the bench's business, never a test's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"system", "concurrency", "answers_per_s", "p50_ms", "p95_ms", "p99_ms", "failures", "mean_batch_size"}
needs_haproxy = pytest.mark.skipif(not Path("/usr/sbin/haproxy").exists(), reason="needs Debian's haproxy")


def ours() -> set[int]:
    """Processes a bench starts: servers, baselines, HAProxy."""
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if any(k in cmd for k in (b"vqa_async.cli serve", b"vqa-async serve", b"bench/baseline.py", b"haproxy -db")):
            pids.add(int(d.name))
    return pids


def test_no_bench_script_shadows_the_standard_library() -> None:
    # bench/ is sys.path[0] for its scripts: a bench/profile.py once broke baseline.py's `import cProfile`.
    clash = {p.stem for p in (ROOT / "bench").glob("*.py")} & set(sys.stdlib_module_names)
    assert not clash


@needs_haproxy
def test_run_writes_the_contracted_files_and_leaves_nothing_running(tmp_path: Path) -> None:
    before = ours()
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "bench/run.py", "--systems", "baseline,serve,cluster,ceiling", "--concurrency",
                    "1,4", "--requests", "16", "--out", str(out)], cwd=ROOT, check=True, timeout=600,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    rows = json.loads((out / "results.json").read_text())
    assert {(r["system"], r["concurrency"]) for r in rows} == {
        (s, c) for s in ("baseline", "serve", "cluster", "ceiling") for c in (1, 4)}
    for r in rows:
        assert r.keys() >= ROW_KEYS, r
        assert r["failures"] == 0 and r["answers_per_s"] > 0, r
    md = (out / "results.md").read_text()
    assert "serve/baseline" in md and "cluster/ceiling" in md
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert ours() <= before, "the bench left a process behind"


@needs_haproxy
def test_breakdown_accounts_for_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "breakdown"
    subprocess.run([sys.executable, "bench/breakdown.py", "--concurrency", "8", "--requests", "64", "--out",
                    str(out)], cwd=ROOT, check=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    p = json.loads((out / "breakdown.json").read_text())
    assert p["answers"] == 64 and p["model_calls"] > 0
    parts = {r["part"]: r for r in p["rows"]}
    for part in ("load generator", "HAProxy", "worker: decode", "worker: preprocess", "worker: vision",
                 "worker: decoder"):
        assert parts[part]["cpu_s"] >= 0, part
    assert parts["worker: decoder"]["cpu_s"] > 0
    assert abs(sum(r["share"] for r in p["rows"]) - 1) < 0.01
    assert "CPU ms per answer" in (out / "breakdown.md").read_text()


def test_http_floor_reports_cpu_per_request() -> None:
    out = subprocess.run([sys.executable, "bench/http_floor.py", "--requests", "200", "--concurrency", "8"], cwd=ROOT,
                         check=True, timeout=300, capture_output=True, text=True).stdout
    floor = json.loads(out.strip().splitlines()[-1])
    assert floor["failures"] == 0 and floor["server_cpu_ms_per_request"] > 0
