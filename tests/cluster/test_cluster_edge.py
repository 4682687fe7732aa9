"""The cluster's edges: its private runtime directory, the PID `cluster reload` signals, per-source limits and
`abortonclose` at HAProxy."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cluster_support import RunningCluster, faulty_env, set_faults, start_cluster, stop_cluster

from bench.lib.loadgen import easy_vqa_requests, encode_forms, run_load
from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.cluster.runtime import RuntimeDirError, prepare_dir, read_json, write_json
from vqa_async.cluster.supervisor import free_port_pair

needs_haproxy = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vqa_async.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_runtime_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # what another local user would pre-create in /tmp
    out = cli("cluster", "--port", str(free_port_pair()), "--runtime-dir", str(shared))
    assert out.returncode == 2 and "writable by others" in out.stderr, out
    assert list(shared.iterdir()) == []  # nothing was written into it
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(RuntimeDirError, match="symlink"):
        prepare_dir(link)
    fresh = prepare_dir(tmp_path / "fresh")
    assert fresh.stat().st_mode & 0o777 == 0o700
    write_json(fresh / "state.json", {"pid": 1})
    assert (fresh / "state.json").stat().st_mode & 0o777 == 0o600 and read_json(fresh / "state.json") == {"pid": 1}
    (fresh / "state.json").chmod(0o666)
    with pytest.raises(RuntimeDirError, match="writable by others"):
        read_json(fresh / "state.json")


def test_reload_refuses_to_signal_a_pid_that_is_not_the_cluster(tmp_path: Path) -> None:
    port = free_port_pair()
    rdir = prepare_dir(tmp_path / "rt")
    bystander = subprocess.Popen(["sleep", "60"])  # SIGUSR2 (what `cluster reload` sends) would end it
    try:
        write_json(rdir / "state.json", {"pid": bystander.pid, "port": port})
        out = cli("cluster", "reload", "--port", str(port), "--runtime-dir", str(rdir))
        assert out.returncode == 2 and "not `vqa-async cluster`" in out.stderr, out
        time.sleep(0.3)
        assert bystander.poll() is None
        assert not list(rdir.glob("reload-request-*"))  # nothing asked either
    finally:
        bystander.kill()
        bystander.wait()


@pytest.fixture(scope="module")
def slow_faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge-faults") / "faults.json"


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, slow_faults: Path) -> Iterator[RunningCluster]:
    """One worker taking one request at a time; 4 connections and 1 request/s (over 10 s) per client address."""
    cl = start_cluster(tmp_path_factory.mktemp("edge"), demo_dir, "--server-maxconn", "1", "--max-batch-size", "1",
                       "--max-conn-per-source", "4", "--rate-limit-per-source", "1", workers=1,
                       env=faulty_env(slow_faults))
    yield cl
    stop_cluster(cl)


def requests_served(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m) for m in re.findall(r'^vqa_requests_total\{[^}]*route="/v1/vqa"[^}]*\} (\S+)', text, re.M))


@needs_haproxy
def test_a_queued_request_whose_client_left_never_reaches_a_worker(one_slot: RunningCluster,
                                                                    slow_faults: Path) -> None:
    worker = one_slot.state()["workers"][0]
    form = encode_forms(easy_vqa_requests(1))[0]
    set_faults(slow_faults, {worker["port"]: "slow:3"})  # each model call takes 3 s: the one slot stays busy
    before = requests_served(worker["port"])

    async def post(session: aiohttp.ClientSession) -> int:
        async with session.post(one_slot.url + "/v1/vqa", data=form.body,
                                headers={"Content-Type": form.content_type}) as r:
            await r.read()
            return r.status

    async def scenario() -> int:
        # From an address of its own: the per-source rate limit that another test of this module exhausts for
        # 127.0.0.1 (in a random order, before this one) would answer a fast 429 here instead of queueing.
        def session() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.77", 0)))

        async with session() as a, session() as b:
            first = asyncio.create_task(post(a))
            await asyncio.sleep(0.5)
            with pytest.raises(TimeoutError):  # queued at HAProxy behind the first; its client gives up
                await asyncio.wait_for(post(b), 0.5)
            return await first

    try:
        assert asyncio.run(scenario()) == 200
    finally:
        set_faults(slow_faults, {})
    time.sleep(1.0)  # the slot is free: without abortonclose HAProxy would now hand the second one over
    assert requests_served(worker["port"]) - before == 1


@needs_haproxy
def test_per_source_limits_answer_429_in_the_api_shape(one_slot: RunningCluster) -> None:
    results = asyncio.run(run_load(one_slot.url + "/v1/vqa", easy_vqa_requests(10), concurrency=10))
    statuses = Counter(r.status for r in results)
    assert statuses[429] >= 1 and statuses[200] >= 1 and set(statuses) <= {200, 429}, statuses  # 4 connections
    assert {json.loads(r.error or "{}")["error"]["code"] for r in results if r.status == 429} == {"too_many_requests"}
    # The rate: 1 request/s over 10 s is 10 requests; one client sending one after another soon meets it.
    codes: list[int] = []
    t0 = time.monotonic()
    for form in encode_forms(easy_vqa_requests(40)):
        req = urllib.request.Request(one_slot.url + "/v1/vqa", data=form.body,
                                     headers={"Content-Type": form.content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                codes.append(r.status)
        except urllib.error.HTTPError as e:
            codes.append(e.code)
            body, retry_after = json.loads(e.read()), e.headers.get("Retry-After")
            break
    assert codes[-1] == 429, (codes, time.monotonic() - t0)
    assert body["error"]["code"] == "too_many_requests" and retry_after == "1"
