"""Faults beyond a clean kill, through a real cluster (HAProxy + workers on the demo model): a graceful stop, a
SIGKILLed supervisor, a reload onto a broken model under load, a worker that crashes during a reload, a sick
worker and a hung model thread (injected by vqa_async/testing/faults/sitecustomize.py, never in the serving path)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cluster_support import (
    RunningCluster,
    cluster_pids,
    faulty_env,
    gone,
    reference_answers,
    set_faults,
    start_cluster,
    stop_cluster,
)

from bench.lib.loadgen import Result, easy_vqa_requests, run_load
from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.config import Settings
from vqa_async.model.architecture import WEIGHTS_NAME
from vqa_async.testing import launch
from vqa_async.testing.launch import Faults
from vqa_async.testing.overlap import Progress, fire_when, in_flight

pytestmark = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")

# The worker's side of health (lead's change in issue 11): /readyz 503 while its model fails, /healthz 503 once
# a model call runs past --stuck-timeout-s. Without it a sick worker is still kept out of clients' way (HAProxy
# retries its 500s elsewhere) but nothing tells the supervisor to restart it.
WORKER_HEALTH = "stuck_timeout_s" in {f.name for f in dataclasses.fields(Settings)}
STUCK_TIMEOUT_S = 4.0


def test_a_sigkilled_supervisor_takes_its_children_along(tmp_path: Path, demo_dir: Path) -> None:
    cl = start_cluster(tmp_path, demo_dir, workers=1)
    end = time.monotonic() + 60
    while not cl.state()["spare_pids"] and time.monotonic() < end:  # the warm spare must go too
        time.sleep(0.2)
    pids = cluster_pids(cl)
    assert len(pids) == 3, cl.state()  # a worker, HAProxy, a spare
    cl.proc.kill()
    cl.proc.wait()
    end = time.monotonic() + 5
    while not all(gone(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert [p for p in pids if not gone(p)] == []
    # The port and the runtime directory are free for a new cluster at once.
    stop_cluster(launch.start_cluster(demo_dir, workers=1, port=cl.port, runtime_dir=cl.runtime_dir, home=tmp_path))


# -- one cluster for the faults below, with the fault injector in its workers -------------------------------------


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults") / "faults.json"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, faults: Path) -> Iterator[RunningCluster]:
    extra = ["--unready-restart-s", "3"]
    if WORKER_HEALTH:
        extra += ["--stuck-timeout-s", str(STUCK_TIMEOUT_S)]
    cl = start_cluster(tmp_path_factory.mktemp("cluster"), demo_dir, *extra, env=faulty_env(faults))
    yield cl
    set_faults(faults, {})
    stop_cluster(cl)


def worker_model(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
        return str(orjson.loads(r.read())["model"])


LOAD = 300


@pytest.fixture(scope="module")
def expected(cluster: RunningCluster) -> list[str]:
    return reference_answers(cluster, LOAD)


def test_a_broken_reload_rolls_back_and_loses_nothing_under_load(cluster: RunningCluster, tmp_path: Path,
                                                                 demo_dir: Path, expected: list[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    (broken / WEIGHTS_NAME).write_bytes(b"not safetensors")
    state_before = cluster.state()
    models_before = {w["port"]: worker_model(w["port"]) for w in state_before["workers"]}

    progress = Progress(itertools.cycle(easy_vqa_requests(LOAD)), concurrency=16)  # until the reload is over
    done: list[subprocess.CompletedProcess[str]] = []

    async def reload() -> None:
        done.append(await asyncio.to_thread(cluster.reload, "--model", str(broken)))

    async def scenario() -> tuple[list[Result], float, float]:
        load = asyncio.create_task(run_load(cluster.url + "/v1/vqa", progress, concurrency=16))
        began = await fire_when(lambda: progress.answered() >= 50, reload, load=load, stop=progress.stop)
        ended = time.monotonic()
        progress.stop()
        return await load, began, ended

    results, began, ended = asyncio.run(scenario())
    # The load spanned the whole reload and its rollback.
    assert in_flight(results, began) >= 1 and in_flight(results, ended) >= 1, (began, ended)
    reload_done = done[0]
    assert reload_done.returncode == 1, reload_done
    assert "w0" in reload_done.stderr and "back on" in reload_done.stderr, reload_done.stderr
    assert [r for r in results if r.status != 200] == []
    assert Counter(r.answer for r in results) == Counter(expected[i % LOAD] for i in range(progress.taken))
    state = cluster.state()
    assert [w["model"] for w in state["workers"]] == [w["model"] for w in state_before["workers"]]
    assert state["model"] == state_before["model"]
    end = time.monotonic() + 60
    while not cluster.all_up() and time.monotonic() < end:
        time.sleep(0.2)
    assert {w["port"]: worker_model(w["port"]) for w in state["workers"]} == models_before


def test_a_worker_crashing_during_a_reload_is_never_two_processes(cluster: RunningCluster) -> None:
    before = cluster.worker_pids()

    async def scenario() -> subprocess.CompletedProcess[str]:
        reload = asyncio.create_task(asyncio.to_thread(cluster.reload))
        end = time.monotonic() + 120
        while cluster.worker_pids()[0] == before[0] and time.monotonic() < end:
            await asyncio.sleep(0.05)
        os.kill(cluster.worker_pids()[0], signal.SIGKILL)  # the process the reload just started
        return await reload

    reload = asyncio.run(scenario())
    assert reload.returncode in (0, 1), reload  # it may give up on w0; either way it says so and ends
    end = time.monotonic() + 120
    while not cluster.all_up() and time.monotonic() < end:
        time.sleep(0.2)
    # Exactly one process per worker: the supervisor's children are its workers, its spare and HAProxy, no more
    # (read a few times: a spare being started between the two reads is not a leak).
    for _ in range(20):
        children = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(int(p.name)) ==
                    cluster.proc.pid}
        state = cluster.state()
        expected = {*cluster.worker_pids(), state["haproxy_pid"], *state["spare_pids"]}
        if children == expected:
            break
        time.sleep(0.5)
    assert children == expected, (children, state)
    for w in state["workers"]:  # and each one answers on its port
        assert worker_model(w["port"])


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_a_sick_worker_is_kept_from_clients_and_restarted(cluster: RunningCluster, faults: Path) -> None:
    sick = cluster.state()["workers"][1]
    set_faults(faults, {sick["port"]: "fail"})  # every model call of w1 raises
    try:
        results = asyncio.run(run_load(cluster.url + "/v1/vqa", easy_vqa_requests(500), concurrency=32))
        ok = sum(r.status == 200 for r in results)
        print(f"\nsick worker: {ok} of 500 answered 200; {Counter(r.status for r in results)}")
        assert ok >= 495, Counter(r.status for r in results)
        if not WORKER_HEALTH:
            pytest.skip("the restart needs the worker's /readyz to report a failing model (issue 11, worker side)")
        end = time.monotonic() + 60
        while cluster.state()["workers"][1]["pid"] == sick["pid"] and time.monotonic() < end:
            time.sleep(0.2)
        assert cluster.state()["workers"][1]["pid"] != sick["pid"], "the sick worker was restarted"
    finally:
        set_faults(faults, {})
    end = time.monotonic() + 120
    while not cluster.all_up() and time.monotonic() < end:
        time.sleep(0.2)


@pytest.mark.skipif(not WORKER_HEALTH, reason="needs the worker's --stuck-timeout-s (issue 11, worker side)")
def test_a_hung_model_thread_gets_its_worker_restarted(cluster: RunningCluster, faults: Path) -> None:
    hung = cluster.state()["workers"][0]
    set_faults(faults, {hung["port"]: "hang"})

    async def scenario() -> float:
        t0 = time.monotonic()  # requests straight to the worker: its model thread hangs on the first
        load = asyncio.create_task(run_load(f"http://127.0.0.1:{hung['port']}/v1/vqa", easy_vqa_requests(4),
                                            concurrency=4, timeout_s=120))
        while cluster.state()["workers"][0]["pid"] == hung["pid"] and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.2)
        restarted_after = time.monotonic() - t0
        assert all(r.status != 200 for r in await load)
        return restarted_after

    try:
        restarted_after = asyncio.run(scenario())
        print(f"\nhung model thread: worker restarted {restarted_after:.1f} s after the first request "
              f"(stuck timeout {STUCK_TIMEOUT_S} s)")
        assert cluster.state()["workers"][0]["pid"] != hung["pid"]
        assert restarted_after <= 3 * (STUCK_TIMEOUT_S + 10)
    finally:
        set_faults(faults, {})
    end = time.monotonic() + 120
    while not cluster.all_up() and time.monotonic() < end:
        time.sleep(0.2)


def test_graceful_stop_of_the_cluster_answers_everything_in_flight_then_exits_0(
        tmp_path: Path, demo_dir: Path, expected: list[str]) -> None:
    # A cluster of its own: stopping the shared one would leave the other tests of this file (in any order)
    # without one. Every model call 0.3 s slower, so that the 120 requests are still inside when SIGTERM comes.
    faults = Faults(tmp_path / "faults.json")
    cl = launch.start_cluster(demo_dir, faults=faults, home=tmp_path)
    faults.set({w["port"]: "slow:0.3" for w in cl.state()["workers"]})

    async def scenario() -> tuple[list[Result], float]:
        load = asyncio.create_task(run_load(cl.url + "/v1/vqa", easy_vqa_requests(120), concurrency=120))
        # SIGTERM once a request is inside a worker's model (the injector counted the call).
        at = await fire_when(lambda: len(faults.calls()) >= 1, lambda: cl.proc.send_signal(signal.SIGTERM),
                             load=load)
        return await load, at

    try:
        results, at = asyncio.run(scenario())
        assert in_flight(results, at) >= 1, "SIGTERM came after the load"
        assert Counter(r.status for r in results) == {200: 120}, [r.error for r in results if r.status != 200][:3]
        assert Counter(r.answer for r in results) == Counter(expected[:120])
        assert cl.proc.wait(timeout=90) == 0
    finally:
        assert cl.stop() == 0  # and nothing of it is left
