"""The bench's command lines are a contract others script against: run them small, check what they write, and
that they leave no process behind. (The figures themselves are the bench's business, never a test's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vqa_async.cluster.haproxy import find_haproxy

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"system", "concurrency", "answers_per_s", "p50_ms", "p95_ms", "p99_ms", "failures", "mean_batch_size",
            "image_mp", "cpu_ms_per_image"}
needs_haproxy = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")


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
        # Workers run as `.../vqa-async --log-level INFO serve ...`: match the subcommand, not a fixed prefix.
        # LitServe's workers are multiprocessing children of bench/litserve_vqa.py, run by this checkout's Python.
        litserve = b"litserve_vqa.py" in cmd or (b"multiprocessing" in cmd and str(ROOT).encode() in cmd)
        if b"bench/baseline.py" in cmd or b"haproxy -db" in cmd or (b"vqa" in cmd and b" serve " in cmd) or litserve:
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


def test_targets_are_judged_from_the_rows() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from run import check_targets

    def row(system: str, c: int, rate: float, p50: float = 10.0, p95: float = 20.0, failures: int = 0) -> dict:
        return {"system": system, "concurrency": c, "answers_per_s": rate, "p50_ms": p50, "p95_ms": p95,
                "failures": failures}

    cpu = check_targets([row("baseline", 32, 100), row("serve", 32, 300), row("cluster", 32, 84),
                         row("ceiling", 32, 100)], "cpu")
    assert cpu == ["met: serve/baseline at concurrency 32 is 3.00 (target >= 3.0)",
                   "NOT met: cluster/ceiling at concurrency 32 is 0.84 (target >= 0.85)"]
    gpu = check_targets([row("cluster", 128, 310, p95=900, failures=1), row("cluster", 1, 20, p50=61)], "cuda")
    assert [t.split(":")[0] for t in gpu] == ["NOT met", "NOT met"]
    assert check_targets([row("cluster", 128, 310, p95=900), row("cluster", 1, 20, p50=40)], "cuda")[0] == (
        "met: cluster at concurrency 128: 310 answers/s, P95 900 ms, 0 failures (target >= 300/s, P95 <= 1000 ms, "
        "none)")


@pytest.mark.parametrize("regime", ["flat", "linear"])
def test_the_fairness_replay_runs_the_real_collector_on_a_cost_line(regime: str) -> None:
    """bench/fairness_floor.py in virtual time (deterministic, nothing timed): under fair scheduling the small
    client waits for at most the batch in progress and then its own, so its P95 shared is within two full batches
    (plus its time outside the model) whatever the cost line; that is about 2x alone where a batch costs what one
    question does (a GPU), and 5x and more where the cost grows with the batch (this CPU: the line fitted in
    bench/RESULTS.md). FIFO is more than twice as slow for it either way; the bulk client keeps >= 90 %."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fairness_floor import scenario

    size, (v_fixed, v_per, d_fixed, d_per) = {"flat": (64, (2.0, 0.02, 10.0, 0.05)),
                                              "linear": (16, (1.1, 0.7, 7.06, 1.48))}[regime]
    vision = [0.0] + [v_fixed + v_per * n for n in range(1, size + 1)]
    decoder = [0.0] + [d_fixed + d_per * n for n in range(1, size + 1)]
    overhead = 3.0
    fair = scenario(vision, decoder, overhead, 4.0, size, fair=True, shared=0)
    fifo = scenario(vision, decoder, overhead, 4.0, size, fair=False, shared=0)
    assert fair["small_p95_shared_ms"] <= overhead + 2 * (vision[size] + decoder[size]), fair
    assert fair["big_share"] >= 0.9
    assert fifo["ratio"] > 2 * fair["ratio"]
    assert fair["ratio"] < 2.5 if regime == "flat" else fair["ratio"] > 4, fair


def from_here() -> set[int]:
    """`ours()` started from this checkout (other people's servers on a shared box come and go)."""
    here = set()
    for pid in ours():
        try:
            if str(ROOT).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                here.add(pid)
        except OSError:
            continue
    return here


def test_run_on_photos_beside_litserve(tmp_path: Path) -> None:
    before = from_here()
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "bench/run.py", "--systems", "serve,litserve", "--concurrency", "2", "--requests",
                    "14", "--images", "photos", "--out", str(out)], cwd=ROOT, check=True, timeout=600,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    rows = json.loads((out / "results.json").read_text())
    assert {r["system"] for r in rows} == {"serve", "litserve"}
    for r in rows:
        assert r.keys() >= ROW_KEYS, r
        assert r["failures"] == 0 and r["answers_per_s"] > 0, r
        assert 4 < r["image_mp"] < 6, r  # 4 x (0.3 + 2 + 12) MP + 12 MP + 1 MP over 14 photos
    serve, peer = sorted(rows, key=lambda r: r["system"] != "serve")
    assert serve["cpu_ms_per_image"] > 0 and peer["cpu_ms_per_image"] is None
    assert "serve/litserve" in (out / "results.md").read_text()
    assert from_here() <= before, "the bench left a process behind"


def test_page_user_bench_runs_tiny_and_reports_a_row_per_share() -> None:
    before = from_here()
    done = subprocess.run([sys.executable, "bench/page_user.py", "--shares", "0.5,0", "--asks", "1", "--think-s",
                           "0", "--big-concurrency", "2"], cwd=ROOT, check=True, timeout=300, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["preempt_share"] for r in rows] == [0.5, 0.0]
    for r in rows:
        assert r["person_median_ms_alone"] > 0 and r["person_median_ms_beside_bulk"] > 0, r
        assert r["bulk_answers_per_s"] > 0, r
    assert from_here() <= before, "the bench left a process behind"
