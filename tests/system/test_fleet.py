"""Workers on other "machines": three network-namespace hosts (tests/netns_hosts.py), each running a real
`vqa-async serve` on its own address, behind a real HAProxy front in the root namespace (`cluster --workers 0`).
Under closed-loop load at concurrency 50: a host's cable pulled, a host's serve restarted, a host slowed down;
and DNS discovery through Debian's dnsmasq: a host added to the name gets traffic, one removed is drained.
Runs as root with iproute2 (and dnsmasq for discovery); skips with the reason elsewhere."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_support import RunningCluster
from netns_hosts import Host, Hosts, qdisc_available, skip_reason

from bench.lib.loadgen import Result, easy_vqa_requests, encode_forms, run_load
from vqa_async.cluster.haproxy import RuntimeApi, find_haproxy
from vqa_async.cluster.supervisor import free_port, free_port_pair
from vqa_async.testing.launch import start_cluster

_why_not = skip_reason() or (None if find_haproxy() else "needs Debian's haproxy")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

CONCURRENCY = 50
# A request stuck on a dead host would hang until HAProxy's `timeout server` (35 s); the load generator gives
# up on it earlier, so that a hang is a failure. Measured worst latency through a link cut: 2.3 to 3.8 s.
CLIENT_TIMEOUT_S = 12.0


class Front(RunningCluster):
    """A cluster front with no local workers: the hosts' `serve` processes are its servers."""

    @property
    def api(self) -> str:
        return self.url + "/v1/vqa"

    def stats(self) -> dict[str, dict[str, Any]]:
        return asyncio.run(RuntimeApi(self.runtime_dir / "haproxy.sock").stats())

    def up_addresses(self) -> set[str]:
        return {row["addr"].rsplit(":", 1)[0] for row in self.stats().values() if row["status"].startswith("UP")}

    def stop(self, timeout: float = 60, sig: int = signal.SIGTERM) -> int:
        code = super().stop(timeout, sig)  # the launcher's: SIGTERM, then SIGKILL, nothing left
        assert code == 0
        return code


def start_front(tmp: Path, *backend_args: str, up: int) -> Front:
    port = free_port_pair()
    rdir = tmp / f"front-{port}"
    rdir.mkdir()
    # HAProxy's request log, for the termination state of a request that fails
    cl = start_cluster(None, "--haproxy-log", *backend_args, workers=0, port=port, runtime_dir=rdir,
                       log=rdir / "front.log", home=rdir, ready=False)
    front = Front(**{f.name: getattr(cl, f.name) for f in dataclasses.fields(cl)})
    proc = front.proc
    wait_for(lambda: proc.poll() is not None or (rdir / "haproxy.sock").exists() and len(front.up_addresses()) == up,
             timeout=60, what=f"the front with {up} hosts up")
    assert proc.poll() is None, f"cluster exited with {proc.returncode}"
    return front


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `done()`; fails the test after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if done():
                return time.monotonic() - t0
        except (OSError, KeyError):  # the socket or a row not there yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status != 200]


def dropped_at_mark_down(results: list[Result], front: Front) -> int:
    """The failed requests, which must all be HAProxy 2.6's one known drop, and few. With `on-marked-down
    shutdown-sessions` (vqa_async/cluster/backends.py: it is what saves the requests in flight on a host whose
    link is cut), a request that is still connecting to a host, or waiting to retry its connection, at the
    instant that host is marked down is closed (log state D?--) instead of retried. Anything else fails."""
    failed = failures(results)
    if not failed:
        return 0
    log = failed_log_lines(front)
    dropped = sum(re.fullmatch(r"D[A-Z-]--", rec["termination_state"]) is not None for rec in log)
    assert all(r.status == 0 and "ServerDisconnected" in (r.error or "") for r in failed), (failed[:3], log[:5])
    assert len(failed) <= dropped, (failed[:3], log[:5])
    assert len(failed) <= 0.01 * len(results), (len(failed), log[:5])
    return len(failed)


def failed_log_lines(front: Front) -> list[dict]:  # type: ignore[type-arg]
    """HAProxy's JSON log lines (--haproxy-log) of requests that did not end in a 200."""
    lines = (front.runtime_dir / "front.log").read_text(errors="replace").splitlines()
    records = [json.loads(line) for line in lines if line.startswith('{"time"')]
    return [rec for rec in records if rec.get("route") == "/v1/vqa" and rec.get("status") != 200]


def log_errors(front: Front) -> list[dict]:  # type: ignore[type-arg]
    """HAProxy's log lines of requests that did not end in a 200."""
    return failed_log_lines(front)[:5]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Hosts]:
    hs = Hosts(3, tmp_path_factory.mktemp("hosts"))
    try:
        for h in hs.hosts:
            hs.start_serve(h, demo_dir)
        for h in hs.hosts:
            hs.wait_ready(h)
        yield hs
    finally:
        hs.close()


@pytest.fixture(scope="module")
def front(hosts: Hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    args = [a for h in hosts.hosts for a in ("--backend", h.backend)]
    f = start_front(tmp_path_factory.mktemp("front"), *args, up=len(hosts.hosts))
    yield f
    f.stop()


@pytest.fixture(scope="module")
def forms() -> list[Any]:
    return encode_forms(easy_vqa_requests(1500))


def test_a_host_whose_link_goes_down_loses_no_request_and_rejoins(hosts: Hosts, front: Front,
                                                                    forms: list[Any]) -> None:
    victim = hosts.hosts[0]
    down_s = CLIENT_TIMEOUT_S + 2  # longer than a client waits: a request left hanging on it would fail

    async def scenario() -> tuple[list[Result], float]:
        load = asyncio.create_task(run_load(front.api, forms[:1000], CONCURRENCY, timeout_s=CLIENT_TIMEOUT_S))
        await asyncio.sleep(1.5)  # the victim has requests in flight
        hosts.set_link(victim, up=False)
        cut_at = time.monotonic()
        results = await load
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - cut_at)))
        hosts.set_link(victim, up=True)
        rejoin = await asyncio.to_thread(
            wait_for, lambda: victim.addr in front.up_addresses(), 30, "the host back in rotation")
        return results, rejoin

    try:
        results, rejoin_s = asyncio.run(scenario())
    finally:
        hosts.set_link(victim, up=True)
    dropped = dropped_at_mark_down(results, front)
    assert len(results) == 1000
    retried = int(front.stats()["remote0"]["wretr"])
    print(f"\nlink cut under load: {dropped} of 1000 failed ({retried} retried elsewhere), slowest "
          f"{max(r.latency_s for r in results):.2f} s; the host back in rotation {rejoin_s:.2f} s after its link")
    assert rejoin_s <= 5.0


def test_a_host_whose_serve_restarts_loses_no_request(hosts: Hosts, front: Front, forms: list[Any],
                                                      demo_dir: Path) -> None:
    victim = hosts.hosts[1]

    async def scenario() -> tuple[list[Result], int | None]:
        load = asyncio.create_task(run_load(front.api, forms[:800], CONCURRENCY, timeout_s=CLIENT_TIMEOUT_S))
        await asyncio.sleep(1.5)
        code = await asyncio.to_thread(hosts.stop_serve, victim)  # SIGTERM, as systemd or Kubernetes would
        hosts.start_serve(victim, demo_dir)
        return await load, code

    results, code = asyncio.run(scenario())
    assert code == 0, hosts.log_tail(victim)
    dropped = dropped_at_mark_down(results, front)
    hosts.wait_ready(victim)
    back = wait_for(lambda: victim.addr in front.up_addresses(), 10, "the restarted host back in rotation")
    print(f"\nserve restarted under load: {dropped} of 800 failed; back in rotation {back:.2f} s after it was ready")


def _requests_per_server(front: Front, forms: list[Any]) -> tuple[dict[str, int], int]:
    """Load at concurrency 50; HAProxy's own count of the requests each server got (stats `stot`), and how
    often the slow one (remote2) was marked down meanwhile."""
    before = {name: int(row["stot"]) for name, row in front.stats().items()}
    downs = int(front.stats()["remote2"]["chkdown"])
    results = asyncio.run(run_load(front.api, forms[:600], CONCURRENCY, timeout_s=30))
    dropped_at_mark_down(results, front)
    after = front.stats()
    return ({name: int(row["stot"]) - before[name] for name, row in after.items()},
            int(after["remote2"]["chkdown"]) - downs)


def test_least_connections_shifts_load_away_from_a_host_with_a_slow_link(hosts: Hosts, front: Front,
                                                                          forms: list[Any]) -> None:
    why = qdisc_available("netem", "delay", "100ms")
    if why:
        pytest.skip(f"cannot delay a host's link with tc netem on this kernel: {why}")
    slow = hosts.hosts[2]
    subprocess.run(["tc", "qdisc", "add", "dev", slow.port_dev, "root", "netem", "delay", "100ms"], check=True)
    try:
        got, downs = _requests_per_server(front, forms)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", slow.port_dev, "root"], check=False)
    print(f"\nnetem 100 ms on one host's link: requests per server {got}; marked down {downs} times")
    assert got["remote2"] < 0.75 * min(got["remote0"], got["remote1"]), got  # unslowed, each gets a third


def test_least_connections_shifts_load_away_from_a_slow_host(hosts: Hosts, tmp_path: Path, forms: list[Any]) -> None:
    # Each question to the third host is held 1.5 s by a relay in its namespace; its health checks are not.
    slow = hosts.hosts[2]
    relay = subprocess.Popen(["ip", "netns", "exec", slow.netns, sys.executable,
                              str(Path(__file__).parents[1] / "delay_proxy.py"), "--listen", f"{slow.addr}:8001",
                              "--to", slow.backend, "--delay-ms", "1500"])
    f = None
    try:
        args = ["--backend", hosts.hosts[0].backend, "--backend", hosts.hosts[1].backend,
                "--backend", f"{slow.addr}:8001"]
        f = start_front(tmp_path, *args, up=3)
        got, downs = _requests_per_server(f, forms)
    finally:
        if f:
            f.stop()
        relay.terminate()
        relay.wait(10)
    print(f"\n1.5 s more per question on one host: requests per server {got}; marked down {downs} times")
    assert downs == 0  # least-connections moved the load, not the health checks
    assert got["remote2"] < 0.6 * min(got["remote0"], got["remote1"]), got  # unslowed, each gets a third


# -- DNS discovery ----------------------------------------------------------------------------------------------
NAME = "vqa-workers.test"


@dataclass
class Dns:
    """dnsmasq on a loopback port, answering NAME from a hosts file we rewrite; it forwards nothing anywhere."""

    proc: subprocess.Popen[bytes]
    port: int
    hosts_file: Path

    def publish(self, hosts: list[Host]) -> None:
        assert self.proc.poll() is None, f"dnsmasq exited with {self.proc.returncode}"
        self.hosts_file.write_text("".join(f"{h.addr} {NAME}\n" for h in hosts))
        self.proc.send_signal(signal.SIGHUP)  # dnsmasq re-reads its --addn-hosts files


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dns]:
    if shutil.which("dnsmasq") is None:
        pytest.skip("DNS discovery tests need Debian's dnsmasq (apt-get install dnsmasq-base)")
    port = free_port()
    hosts_file = tmp_path / "workers.hosts"
    hosts_file.write_text("")
    proc = subprocess.Popen(
        ["dnsmasq", "--conf-file=/dev/null", "--keep-in-foreground", "--no-resolv", "--no-poll", "--no-hosts",
         "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}", f"--addn-hosts={hosts_file}",
         "--user=root", "--pid-file=", "--local-ttl=0", "--no-negcache"], stderr=subprocess.DEVNULL)
    try:
        # Listening means its signal handlers are set: a SIGHUP before that would kill it.
        wait_for(lambda: proc.poll() is not None or socket.create_connection(("127.0.0.1", port), 1).close() is None,
                 timeout=10, what="dnsmasq listening")
        assert proc.poll() is None, f"dnsmasq exited with {proc.returncode}"
        yield Dns(proc, port, hosts_file)
    finally:
        proc.terminate()
        proc.wait(10)


def test_dns_discovery_adds_and_drains_hosts_without_a_reload(hosts: Hosts, dns: Dns, tmp_path: Path,
                                                              forms: list[Any]) -> None:
    h1, h2, h3 = hosts.hosts
    dns.publish([h1, h2])
    f = start_front(tmp_path, "--backend-dns", f"{NAME}:8000", "--resolver", f"127.0.0.1:{dns.port}", up=2)
    try:
        assert f.up_addresses() == {h1.addr, h2.addr}

        async def scenario() -> tuple[list[Result], float, float, float]:
            # Long enough to still be running when the added host is up: a load that ran out first left the new
            # host nothing to answer (a CI run failed so).
            load = asyncio.create_task(run_load(f.api, (forms * 3)[:3000], CONCURRENCY, timeout_s=CLIENT_TIMEOUT_S))
            await asyncio.sleep(1.0)
            served_h3 = hosts.requests_served(h3)
            dns.publish([h1, h2, h3])
            added = await asyncio.to_thread(wait_for, lambda: hosts.requests_served(h3) > served_h3, 30,
                                            "the added host answering requests")
            dns.publish([h2, h3])
            removed = await asyncio.to_thread(wait_for, lambda: h1.addr not in f.up_addresses(), 30,
                                              "the removed host out of rotation")
            served_h1 = hosts.requests_served(h1)
            await asyncio.sleep(1.0)
            after = hosts.requests_served(h1) - served_h1
            return await load, added, removed, after

        results, added_s, removed_s, h1_after = asyncio.run(scenario())
        dropped = dropped_at_mark_down(results, f)
        assert h1_after == 0  # drained: no new request reached it once it was out
        print(f"\nDNS: an added host answered {added_s:.2f} s after it was published; a removed one was out of "
              f"rotation {removed_s:.2f} s after; {dropped} of {len(results)} failed")
        assert added_s <= 10.0
        assert removed_s <= 10.0
        assert f.up_addresses() == {h2.addr, h3.addr}
        with urllib.request.urlopen(f"http://127.0.0.1:{f.port}/readyz", timeout=5) as r:
            assert r.status == 200
    finally:
        f.stop()
