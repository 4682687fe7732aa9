"""The bench (`python -m bench SCENARIO`): its command lines are a contract others script against, so they are run
small here, with what they write checked and no process left behind; and its workloads are cache-proof: a
`distinct` run against a real `serve` counts no cache hit and no per-batch dedup, and the judge refuses a cached
row. (The figures themselves are the bench's business, never a test's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.lib import report
from bench.lib.loadgen import load, multipart
from bench.lib.systems import Setup, System, start, stop_all
from bench.lib.workloads import STAMP, Workload, ends_with_marker, source_images
from bench.scenarios.sweep import measure
from vqa_async.cluster.haproxy import find_haproxy

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"system", "concurrency", "workload", "repeats", "answers_per_s", "answers_per_s_min", "answers_per_s_max",
            "p95_ms", "failures", "cache_hits", "cache_misses", "dedups", "mean_batch_size"}
needs_haproxy = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def ours(mark: str) -> set[int]:
    """Processes carrying this test's mark in their environment: whatever a bench it ran started (servers,
    workers, HAProxy, peers and their children inherit it), and nothing of other people's on a shared box."""
    pids = set()
    needle = f"BENCH_TEST_MARK={mark}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if needle in (d / "environ").read_bytes():
                    pids.add(int(d.name))
            except OSError:
                continue
    return pids


def gone(mark: str, within_s: float = 10.0) -> bool:
    """No marked process is left within a few seconds (a `sleep` whose loop was just killed ends by itself)."""
    end = time.monotonic() + within_s
    while ours(mark):
        if time.monotonic() > end:
            return False
        time.sleep(0.5)
    return True


def bench(*args: str, timeout: float = 600) -> str:
    """Runs `python -m bench ARGS` and checks that it left no process behind."""
    mark = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, check=True, timeout=timeout,
                         capture_output=True, text=True, env={**ENV, "BENCH_TEST_MARK": mark}).stdout
    assert gone(mark), f"the bench left a process behind: {ours(mark)}"
    return out


@pytest.fixture(scope="module")
def serve() -> Iterator[System]:
    try:
        yield start("serve", Setup(torch_threads=1))
    finally:
        stop_all()


def test_the_trailer_changes_no_pixel_and_every_upload_is_new() -> None:
    from vqa_async.model.preprocess import UploadPixels

    pictures = source_images(None)[:2] + [p for p in source_images("photos") if len(p.data) < 300_000][:1]
    assert len(pictures) == 3
    for p in pictures:
        assert ends_with_marker(p.data)  # the trailer goes after the image's end marker
        stamped = STAMP(p.data)
        assert stamped != p.data and STAMP(p.data) != stamped
        for exact in (False, True):
            up = UploadPixels(64, 10**8, exact=exact)
            assert up.pixels(up.decode(stamped)).equal(up.pixels(up.decode(p.data)))


def test_distinct_counts_no_cache_hit_and_no_dedup_on_a_real_serve(serve: System) -> None:
    row = measure(serve, Workload("distinct"), 8, 48)
    assert row["failures"] == 0
    assert row["cache_hits"] == 0 and row["dedups"] == 0, row
    assert row["cache_misses"] == 48 + 8  # the warm-up's and the row's: every upload ran the vision encoder
    # The counters can see a cache: follow-up questions about one image are answered from it (by image_id).
    follow = measure(serve, Workload("follow-up", k=3), 4, 24)
    assert follow["failures"] == 0 and follow["cache_hits"] > 0 and follow["follow_ups_by_image_id"] > 0, follow


def test_a_stamped_upload_gets_the_answer_of_the_plain_one(serve: System) -> None:
    for p in source_images(None)[:4]:
        plain, stamped = load(serve.url + "/v1/vqa", [multipart(p.data, [p.question]),
                                                        multipart(STAMP(p.data), [p.question])], 1)
        assert plain.status == stamped.status == 200
        assert plain.answer == stamped.answer and plain.image_id != stamped.image_id


def test_many_people_come_from_many_addresses(serve: System) -> None:
    row = measure(serve, Workload("many-people"), 5, 20)
    assert row["failures"] == 0 and row["cache_hits"] == 0 and row["dedups"] == 0
    results = load(serve.url + "/v1/vqa", Workload("many-people").jobs(10), 5,
                   sources=Workload("many-people").sources(5))
    assert {r.client for r in results} == set(range(5)) and all(r.status == 200 for r in results)


def row(system: str, rate: float, hits: int | None = 0, workload: str = "distinct", p95: float = 20.0) -> dict:
    return {"system": system, "concurrency": 32, "answers_per_s": rate, "p50_ms": 10.0, "p95_ms": p95,
            "failures": 0, "cache_hits": hits, "dedups": 0, "workload": workload, "repeat": 0}


def test_the_judge_refuses_a_cached_row() -> None:
    clean = [row("baseline", 100, None), row("serve", 300)]
    rat = report.ratios(clean)
    assert report.judge(clean, rat, "cpu") == [
        "met: serve/baseline at concurrency 32 is 3.00 [3.00–3.00] (median [min–max] of 1 repeats; target >= 3.0)"]
    cached = [row("baseline", 100, None), row("serve", 300, hits=40)]
    (verdict,) = report.judge(cached, report.ratios(cached), "cpu")
    assert verdict.startswith("not judged: serve c=32 counted 40 cache hits"), verdict
    follow = [row("baseline", 100, None, "follow-up"), row("serve", 300, 40, "follow-up")]
    assert report.judge(follow, report.ratios(follow), "cpu")[0].startswith("not judged")  # targets: distinct


def test_repeats_fold_into_median_min_max_and_ratios_per_repeat() -> None:
    runs = [{**row("serve", rate), "repeat": i} for i, rate in enumerate((300, 200, 400))]
    runs += [{**row("baseline", rate, None), "repeat": i} for i, rate in enumerate((100, 100, 50))]
    folded = {r["system"]: r for r in report.fold(runs)}
    assert (folded["serve"]["answers_per_s"], folded["serve"]["answers_per_s_min"],
            folded["serve"]["answers_per_s_max"], folded["serve"]["repeats"]) == (300, 200, 400, 3)
    assert folded["baseline"]["cache_hits"] is None  # not counted, never a made-up 0
    assert report.ratios(runs)["serve/baseline"][32] == {"median": 3.0, "min": 2.0, "max": 8.0, "n": 3}


@needs_haproxy
def test_sweep_writes_the_contracted_rows_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    bench("sweep", "--systems", "baseline,serve,cluster,ceiling,litserve-fast", "--concurrency", "2", "--workload",
          "distinct", "--repeats", "2", "--requests", "8", "--torch-threads", "1", "--out", str(out))
    rows = json.loads((out / "results.json").read_text())
    assert {r["system"] for r in rows} == {"baseline", "serve", "cluster", "ceiling", "litserve-fast"}
    for r in rows:
        assert r.keys() >= ROW_KEYS, r
        assert r["failures"] == 0 and r["answers_per_s"] > 0 and r["repeats"] == 2, r
        assert r["answers_per_s_min"] <= r["answers_per_s"] <= r["answers_per_s_max"]
        assert r["workload"] == "distinct"
        assert r["others_cpu_s_max"] <= 0.1, r  # the other systems were frozen while it was measured
    by = {r["system"]: r for r in rows}
    for name in ("serve", "cluster"):
        assert by[name]["cache_hits"] == 0 and by[name]["dedups"] == 0 and by[name]["cache_misses"] > 0
    assert by["litserve-fast"]["cache_hits"] is None and by["baseline"]["cache_hits"] is None
    ceiling = by["ceiling"]
    assert ceiling["model_only"] and ceiling["p95_ms"] is None and ceiling["compute_p95_ms"] > 0
    assert ceiling["mean_batch_size"] == 2 and ceiling["model_calls"] > 0
    md = (out / "results.md").read_text()
    assert "0 hits and 0 dedups on every row" in md and "serve/baseline" in md and "model-only" in md
    assert "every other was frozen (SIGSTOP)" in md and "cluster/litserve-fast" in md
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_ablation_gives_each_step_and_its_gain(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    bench("ablation", "--steps", "batching,fast-decoder,follow-up-no-cache,cache", "--concurrency", "2",
          "--requests", "8", "--repeats", "1", "--torch-threads", "1", "--out", str(out))
    rows = {r["step"]: r for r in json.loads((out / "results.json").read_text())}
    assert list(rows) == ["batching", "fast-decoder", "follow-up-no-cache", "cache"]
    for r in rows.values():
        assert r["failures"] == 0 and r["answers_per_s"] > 0, r
    for step in ("batching", "fast-decoder", "follow-up-no-cache"):
        assert rows[step]["cache_hits"] == 0 and rows[step]["dedups"] == 0, rows[step]
    assert rows["follow-up-no-cache"]["follow_ups_reuploaded"] > 0  # 409 without a cache: sent again
    assert rows["cache"]["cache_hits"] > 0
    assert rows["fast-decoder"]["gain_over"] == "batching" and rows["fast-decoder"]["gain"]["n"] == 1
    assert "0 cache hits and 0 dedups on every `distinct` row" in (out / "results.md").read_text()


def test_gpu_script_dry_run_counts_flops_and_mfu(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, check=True, timeout=600, capture_output=True,
                   env={**ENV, "OUT": str(tmp_path), "BENCH_TEST_MARK": mark})
    assert gone(mark), f"gpu.sh left a process behind: {ours(mark)}"
    summary = (tmp_path / "summary.md").read_text()
    assert "FAILED" not in summary, summary
    assert "GFLOP per answer" in summary and "counted by FlopCounterMode" in summary
    assert "source: dry run" in summary and "MFU" in summary


def test_many_people_scenario_reports_each_setting(tmp_path: Path) -> None:
    done = bench("many-people", "--people", "3", "--seconds", "1.5", "--repeats", "1", "--targets", "serve",
                 "--settings", "fifo,default", "--torch-threads", "1", "--out", str(tmp_path))
    rows = {r["setting"]: r for r in json.loads(done.strip().splitlines()[-1])}
    assert set(rows) == {"fifo", "default"}
    for r in rows.values():
        assert r["failures"] == 0 and r["answers_per_s"] > 0 and r["people_seen"] == 3, r
        assert r["cache_hits"] == 0 and r["dedups"] == 0
    assert "serve default/serve fifo" in (tmp_path / "results.md").read_text()


@needs_haproxy
def test_breakdown_accounts_for_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "breakdown"
    bench("breakdown", "--concurrency", "8", "--requests", "64", "--torch-threads", "1", "--out", str(out))
    p = json.loads((out / "breakdown.json").read_text())
    assert p["answers"] == 64 and p["model_calls"] > 0 and p["cache_hits"] == 0 and p["dedups"] == 0
    parts = {r["part"]: r for r in p["rows"]}
    for part in ("load generator", "HAProxy", "worker: decode", "worker: preprocess", "worker: vision",
                 "worker: decoder"):
        assert parts[part]["cpu_s"] >= 0, part
    assert parts["worker: decoder"]["cpu_s"] > 0
    assert abs(sum(r["share"] for r in p["rows"]) - 1) < 0.01
    assert "CPU ms per answer" in (out / "breakdown.md").read_text()


def test_http_floor_reports_cpu_per_request() -> None:
    floor = json.loads(bench("http-floor", "--requests", "200", "--concurrency", "8").strip().splitlines()[-1])
    assert floor["failures"] == 0 and floor["server_cpu_ms_per_request"] > 0


@pytest.mark.parametrize("regime", ["flat", "linear"])
def test_the_fairness_replay_runs_the_real_collector_on_a_cost_line(regime: str) -> None:
    """The fairness replay in virtual time (deterministic, nothing timed): under fair scheduling the small client
    waits for at most the batch in progress and then its own, so its P95 shared is within two full batches (plus
    its time outside the model) whatever the cost line; FIFO is clearly slower for it either way; the
    bulk client keeps >= 90 %."""
    from bench.scenarios.fairness_replay import scenario

    size, (v_fixed, v_per, d_fixed, d_per) = {"flat": (64, (2.0, 0.02, 10.0, 0.05)),
                                              "linear": (16, (1.1, 0.7, 7.06, 1.48))}[regime]
    vision = [0.0] + [v_fixed + v_per * n for n in range(1, size + 1)]
    decoder = [0.0] + [d_fixed + d_per * n for n in range(1, size + 1)]
    overhead = 3.0
    fair = scenario(vision, decoder, overhead, 4.0, size, fair=True, shared=0)
    fifo = scenario(vision, decoder, overhead, 4.0, size, fair=False, shared=0)
    assert fair["small_p95_shared_ms"] <= overhead + 2 * (vision[size] + decoder[size]), fair
    assert fair["big_share"] >= 0.9
    assert fifo["ratio"] > 1.5 * fair["ratio"]


def test_page_user_runs_tiny_and_reports_a_row_per_share() -> None:
    # (the fairness scenario's tiny run is in tests/test_team.py)
    rows = json.loads(bench("page-user", "--shares", "0.5,0", "--asks", "1", "--think-s", "0", "--big-concurrency",
                            "2", "--repeats", "1").strip().splitlines()[-1])
    assert [r["preempt_share"] for r in rows] == [0.5, 0.0]
    for r in rows:
        assert r["person_median_ms_alone"] > 0 and r["person_median_ms_beside_bulk"] > 0, r
        assert r["bulk_answers_per_s"] > 0, r


def test_batch_job_runs_tiny_and_compares_the_job_with_the_bench_on_new_uploads() -> None:
    out = json.loads(bench("batch-job", "--requests", "24", "--repeats", "1", "--concurrency", "4").strip()
                     .splitlines()[-1])
    assert {r["who"] for r in out["runs"]} == {"batch-job", "bench"}
    for r in out["runs"]:
        assert r["answered"] == 24 and r["failed"] == 0, r
        assert r["cache_hits"] == 0 and r["dedups"] == 0, r  # the job's uploads are as new as the bench's
    assert len(out["ratios"]) == 1 and out["ratio_median"] > 0
