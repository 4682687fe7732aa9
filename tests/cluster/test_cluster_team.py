"""The cluster for a team, through a real HAProxy and real workers on the demo model: API keys held back, wrong,
rotated with SIGHUP (on every worker, and on the warm spare that replaces a killed one), the probes open, no key
in any log; and one metrics view, the front's /metrics summed over the workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from cluster_support import RunningCluster, start_cluster, stop_cluster
from prometheus_client.parser import text_string_to_metric_families

from bench.lib.loadgen import Form, easy_vqa_requests, encode_forms
from vqa_async.cluster.children import start_child
from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.http.auth import KeyRing

needs_haproxy = pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")

ALICE, BOB = "alice-cluster-key-0123456789", "bob-cluster-key-9876543210"
ALICE_ROTATED, WRONG = "alice-rotated-key-5555555555", "not-a-key-of-anyone-000000"
ALL_KEYS = (ALICE, BOB, ALICE_ROTATED, WRONG)


def write_keys(path: Path, text: str) -> None:
    """As an operator should: a new file moved into place, so that a worker never reads half of one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.fixture(scope="module")
def team_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("team-cluster")


@pytest.fixture(scope="module")
def keys_file(team_dir: Path) -> Path:
    path = team_dir / "keys"
    write_keys(path, f"alice:{ALICE}\nbob:{BOB}\n")
    return path


@pytest.fixture(scope="module")
def team(team_dir: Path, keys_file: Path, demo_dir: Path) -> Iterator[RunningCluster]:
    cl = start_cluster(team_dir, demo_dir, "--api-keys", str(keys_file), log_to=team_dir / "cluster.log")
    yield cl
    stop_cluster(cl)


FORM: list[Form] = []


def ask(cl: RunningCluster, headers: dict[str, str]) -> tuple[int, dict[str, Any], Message]:
    """One question through the front: status, JSON body, headers."""
    if not FORM:
        FORM.extend(encode_forms(easy_vqa_requests(1)))
    req = urllib.request.Request(cl.url + "/v1/vqa", data=FORM[0].body,
                                 headers={"Content-Type": FORM[0].content_type, **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def statuses_by_worker(cl: RunningCluster, headers: dict[str, str], n: int = 8) -> dict[str, set[int]]:
    """n questions one after another (HAProxy's leastconn takes turns between idle workers): statuses by worker."""
    seen: dict[str, set[int]] = {}
    for _ in range(n):
        status, _, h = ask(cl, headers)
        seen.setdefault(str(h.get("X-Served-By")), set()).add(status)
    return seen


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return str(r.read().decode())


def total(text: str, sample: str, **labels: str) -> float:
    """The sum of `sample` over the series whose labels include `labels`."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def series(text: str, sample: str) -> list[dict[str, str]]:
    return [s.labels for family in text_string_to_metric_families(text) for s in family.samples if s.name == sample]


def wait_for(what: str, done: Any, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < end, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.3)


def both_up(team: RunningCluster) -> None:
    """Both workers in rotation (a test before this one, in any order, may have killed one)."""
    wait_for("both workers up", lambda: len(team.server_status()) == 2 and team.all_up(), 120)


def alice_takes(team: RunningCluster, key: str) -> bool:
    return statuses_by_worker(team, {"X-API-Key": key}, 4) == {"w0": {200}, "w1": {200}}


def use_alice_key(team: RunningCluster, keys_file: Path, key: str) -> None:
    """Alice's key is `key` on every worker (a rotation by SIGHUP if it is not yet): each test sets the keys it
    needs, so that the tests pass alone and in any order."""
    both_up(team)
    if alice_takes(team, key):
        return
    other = ALICE_ROTATED if key == ALICE else ALICE
    write_keys(keys_file, f"alice:{key}\nbob:{BOB}\n")
    team.proc.send_signal(signal.SIGHUP)
    wait_for(f"alice's key {key[:12]}... on every worker", lambda: alice_takes(team, key) and statuses_by_worker(
        team, {"X-API-Key": other}, 4) == {"w0": {401}, "w1": {401}}, 15)


# -- keys ------------------------------------------------------------------------------------------------------
@needs_haproxy
def test_keys_are_asked_for_at_the_front_and_the_probes_stay_open(team: RunningCluster, keys_file: Path) -> None:
    use_alice_key(team, keys_file, ALICE)
    downs = team.server_status("chkdown")
    status, body, headers = ask(team, {})
    assert status == 401 and body["error"]["code"] == "unauthorized", body
    assert headers["WWW-Authenticate"] == 'Bearer realm="vqa-async"'
    assert headers["X-Served-By"] in ("w0", "w1")  # a worker refused it: the keys reached it
    assert statuses_by_worker(team, {"X-API-Key": WRONG}) == {"w0": {401}, "w1": {401}}
    assert statuses_by_worker(team, {"Authorization": f"Bearer {ALICE}"}) == {"w0": {200}, "w1": {200}}
    assert statuses_by_worker(team, {"X-API-Key": BOB}) == {"w0": {200}, "w1": {200}}
    status, body, _ = ask(team, {"X-API-Key": ALICE})
    assert status == 200 and body["answer"], body
    for probe in ("/healthz", "/readyz"):
        with urllib.request.urlopen(team.url + probe, timeout=5) as r:
            assert r.status == 200
    # HAProxy's own health checks (GET /readyz, no key) kept both workers up all along.
    assert team.all_up() and team.server_status("chkdown") == downs, (downs, team.server_status("chkdown"))


@needs_haproxy
def test_the_fronts_metrics_are_the_sum_over_the_workers(team: RunningCluster) -> None:
    both_up(team)
    n = 24
    before = scrape(team.url)
    own_before = [scrape(f"http://127.0.0.1:{w['port']}") for w in team.state()["workers"]]
    served = Counter()
    for _ in range(n):
        status, _, h = ask(team, {"X-API-Key": BOB})
        assert status == 200
        served[h.get("X-Served-By")] += 1
    assert set(served) == {"w0", "w1"}, served  # both workers answered some
    after = scrape(team.url)
    assert total(after, "vqa_requests_total", route="/v1/vqa", status="200") - \
        total(before, "vqa_requests_total", route="/v1/vqa", status="200") == n
    assert total(after, "vqa_client_requests_total", client="bob") - \
        total(before, "vqa_client_requests_total", client="bob") == n
    # Per-client labels are key names only; a gauge is one series (summed over live workers), not one per process.
    assert {labels["client"] for labels in series(after, "vqa_client_requests_total")} <= {"alice", "bob"}
    assert len(series(after, "vqa_queue_depth")) == 1
    # Each worker's own /metrics stays its own (the bench sums those itself): together they make the front's
    # (counted over this test: a worker killed earlier left its counts in the front's sum, not in a live worker's).
    own = [scrape(f"http://127.0.0.1:{w['port']}") for w in team.state()["workers"]]
    mine = [total(t, "vqa_requests_total", route="/v1/vqa") - total(b, "vqa_requests_total", route="/v1/vqa")
            for t, b in zip(own, own_before, strict=True)]
    front = total(after, "vqa_requests_total", route="/v1/vqa") - total(before, "vqa_requests_total", route="/v1/vqa")
    assert all(m > 0 for m in mine) and sum(mine) == front == n, (mine, front)
    with urllib.request.urlopen(team.url + "/openapi.json", timeout=5) as r:  # the route the front uses is described
        assert "/metrics/cluster" in json.loads(r.read())["paths"]


@needs_haproxy
def test_sighup_rotates_the_keys_on_every_worker_without_a_restart(team: RunningCluster, keys_file: Path) -> None:
    use_alice_key(team, keys_file, ALICE)
    pids = team.worker_pids()
    write_keys(keys_file, f"alice:{ALICE_ROTATED}\nbob:{BOB}\n")
    t0 = time.monotonic()
    team.proc.send_signal(signal.SIGHUP)

    def rotated() -> bool:
        return (statuses_by_worker(team, {"X-API-Key": ALICE}, 4) == {"w0": {401}, "w1": {401}}
                and statuses_by_worker(team, {"Authorization": f"Bearer {ALICE_ROTATED}"}, 4)
                == {"w0": {200}, "w1": {200}})

    wait_for("old key refused and new key taken by every worker", rotated, 15)
    print(f"\nkeys rotated on both workers {time.monotonic() - t0:.2f} s after SIGHUP")
    assert team.worker_pids() == pids  # re-read in place: not a rolling reload (that is `cluster reload`)
    assert statuses_by_worker(team, {"X-API-Key": BOB}) == {"w0": {200}, "w1": {200}}


@needs_haproxy
def test_a_killed_worker_comes_back_with_the_current_keys_and_the_sum_does_not_go_back(
        team: RunningCluster, keys_file: Path) -> None:
    use_alice_key(team, keys_file, ALICE_ROTATED)  # keys changed since the cluster started
    before = total(scrape(team.url), "vqa_requests_total", route="/v1/vqa")
    victim = team.state()["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        new = team.state()["workers"][1]
        if new["pid"] == victim["pid"]:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{new['port']}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for("w1 replaced and ready", replaced, 120)
    # The dead worker's counts stay in the sum; its replacement counts from zero beside them.
    assert total(scrape(team.url), "vqa_requests_total", route="/v1/vqa") == before
    # The replacement (the warm spare, which reads the keys file as it becomes a worker) has the rotated keys.
    # HAProxy may take w1 out and back in meanwhile (its checks saw the port refused): ask until both answer.
    sent = 0

    def both_answer() -> bool:
        nonlocal sent
        sent += 16
        old = statuses_by_worker(team, {"X-API-Key": ALICE})
        new = statuses_by_worker(team, {"X-API-Key": ALICE_ROTATED})
        return old == {"w0": {401}, "w1": {401}} and new == {"w0": {200}, "w1": {200}}

    wait_for("the replaced w1 refusing the old key and taking the new one", both_answer, 60)
    assert total(scrape(team.url), "vqa_requests_total", route="/v1/vqa") == before + sent


@needs_haproxy
def test_no_key_reaches_the_clusters_logs(team: RunningCluster, team_dir: Path, keys_file: Path) -> None:
    # A rotation (whatever ran before) and a question from each client, so that the log has all there is to leak.
    use_alice_key(team, keys_file, ALICE if alice_takes(team, ALICE_ROTATED) else ALICE_ROTATED)
    assert ask(team, {"X-API-Key": BOB})[0] == 200
    text = (team_dir / "cluster.log").read_text(errors="replace")
    assert [k for k in ALL_KEYS if k in text] == []
    assert '"client":"alice"' in text and '"client":"bob"' in text  # names do, in the access log
    assert "SIGHUP passed on to workers w0, w1" in text and text.count("API keys reloaded") >= 2


# -- pieces of the rotation that are hard to time through the processes ----------------------------------------
def test_a_worker_ignores_sighup_until_its_handler_is_set() -> None:
    # A SIGHUP passed on while a worker is still importing or loading must not kill it.
    async def scenario() -> int | None:
        proc = await start_child(sys.executable, "-c", "import time; time.sleep(30)", ignore_hup=True)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        code = proc.returncode
        proc.kill()
        await proc.wait()
        return code

    assert asyncio.run(scenario()) is None


def test_keys_rotated_while_a_worker_started_are_picked_up_once_it_listens(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    write_keys(path, f"alice:{ALICE}\n")
    ring = KeyRing(str(path))
    ring.reload_if_changed()
    assert ring.find(ALICE) is not None
    write_keys(path, f"alice:{ALICE_ROTATED}\n")  # its SIGHUP came while SIGHUP was still ignored
    ring.reload_if_changed()
    assert ring.find(ALICE) is None and ring.find(ALICE_ROTATED) is not None
