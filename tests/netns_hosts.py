"""Test "hosts" as Linux network namespaces on this machine: each one a namespace with its own address on a
private bridge, running a real `vqa-async serve`. Pulling a host's cable is `ip link set <its port> down`.

    root namespace: bridge vq<tag>br 10.77.<n>.1/24 ─┬─ vq<tag>h1 ═ veth ═ eth0 10.77.<n>.11 (namespace vqa-<tag>-h1)
                                                       ├─ vq<tag>h2 ═ veth ═ eth0 10.77.<n>.12
                                                       └─ …
Traffic stays on this machine: the namespaces have no default route, and the root namespace gets an
`unreachable` route for the subnet (a higher metric than the bridge's), so even with the bridge gone nothing
for these addresses is sent anywhere else. Needs root and iproute2; `skip_reason()` says why not.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vqa_async.testing import launch

SERVE_PORT = 8000


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network-namespace hosts need iproute2's `ip` (apt-get install iproute2)"
    probe = f"vqa-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def qdisc_available(kind: str, *params: str) -> str | None:
    """None if `tc qdisc add … <kind>` works on this kernel, else why not (e.g. sch_netem is not built)."""
    if shutil.which("tc") is None:
        return "no `tc` (apt-get install iproute2)"
    dev = f"vqprobe{os.getpid() % 100000}"
    ip("link", "add", dev, "type", "veth", "peer", "name", dev + "p")  # `dummy` may not be built either
    try:
        done = subprocess.run(["tc", "qdisc", "add", "dev", dev, "root", kind, *params], capture_output=True, text=True)
        return None if done.returncode == 0 else f"tc qdisc {kind}: {done.stderr.strip()}"
    finally:
        ip("link", "del", dev, check=False)


def _free_subnet() -> int:
    used = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "addr").stdout
    for n in range(100, 250):
        if not re.search(rf"\b10\.77\.{n}\.", used):
            return n
    raise RuntimeError("no free 10.77.N.0/24 subnet for test hosts")


@dataclass
class Host:
    netns: str
    port_dev: str  # the root-side veth, a port of the bridge: down = the host's cable pulled
    addr: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{SERVE_PORT}"

    @property
    def backend(self) -> str:
        return f"{self.addr}:{SERVE_PORT}"


@dataclass
class Hosts:
    """`count` namespace hosts on one bridge; `close()` removes every trace (also after a failed test)."""

    count: int
    workdir: Path
    tag: str = field(default_factory=lambda: f"{os.getpid() % 10000:04d}")
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.subnet = _free_subnet()
        self.bridge = f"vq{self.tag}br"
        self.gateway = f"10.77.{self.subnet}.1"
        self.cidr = f"10.77.{self.subnet}.0/24"
        try:
            ip("route", "add", "unreachable", self.cidr, "metric", "4000")
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(1, self.count + 1):
                self._add_host(i)
        except BaseException:
            self.close()
            raise

    def _add_host(self, i: int) -> None:
        h = Host(netns=f"vqa-{self.tag}-h{i}", port_dev=f"vq{self.tag}h{i}", addr=f"10.77.{self.subnet}.{10 + i}")
        ip("netns", "add", h.netns)
        self.hosts.append(h)  # from here on close() removes it
        ip("link", "add", h.port_dev, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        ip("link", "set", h.port_dev, "master", self.bridge, "up")
        ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
        ip("-n", h.netns, "link", "set", "eth0", "up")
        ip("-n", h.netns, "link", "set", "lo", "up")

    # -- serve inside a host ------------------------------------------------------------------------------------
    def start_serve(self, h: Host, model: Path, *extra: str) -> None:
        h.log = self.workdir / f"{h.netns}.log"
        # `ip netns exec` execs the command: the process is the serve process itself, so signals reach it.
        # SIGTERM takes the host out of the front's rotation before it stops listening, as a host behind a front
        # should be run (README). Ready is waited for by wait_ready below.
        h.proc = launch.start_serve(model, "--host", h.addr, "--torch-threads", "1", "--drain-s", "1.5", *extra,
                                    port=SERVE_PORT, wrap=["ip", "netns", "exec", h.netns], log=h.log,
                                    access_log=None, host=h.addr, home=self.workdir / h.netns, ready=False).proc

    def wait_ready(self, h: Host, timeout: float = 240) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert h.proc is not None
            if h.proc.poll() is not None:
                raise RuntimeError(f"serve on {h.netns} exited with {h.proc.returncode}: {self.log_tail(h)}")
            with contextlib.suppress(OSError), urllib.request.urlopen(h.url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"serve on {h.netns} not ready within {timeout:.0f} s: {self.log_tail(h)}")

    def stop_serve(self, h: Host, timeout: float = 60) -> int | None:
        if h.proc is None or h.proc.poll() is not None:
            return h.proc.returncode if h.proc else None
        return launch.stop_process(h.proc, timeout)  # SIGTERM: serve answers what it holds, then exits 0

    def log_tail(self, h: Host) -> str:
        return h.log.read_text(errors="replace")[-2000:] if h.log and h.log.exists() else ""

    # -- faults -------------------------------------------------------------------------------------------------
    def set_link(self, h: Host, up: bool) -> None:
        ip("link", "set", h.port_dev, "up" if up else "down")

    def requests_served(self, h: Host) -> float:
        """The host's own count of answered /v1/vqa requests (its /metrics), independent of HAProxy's view."""
        with urllib.request.urlopen(h.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in
                   re.finditer(r'^vqa_requests_total\{[^}]*route="/v1/vqa"[^}]*status="200"[^}]*\} (\S+)$', text,
                               re.M))

    def close(self) -> None:
        for h in self.hosts:
            self.stop_serve(h, timeout=30)
            ip("netns", "del", h.netns, check=False)
            ip("link", "del", h.port_dev, check=False)
        ip("link", "del", self.bridge, check=False)
        ip("route", "del", "unreachable", self.cidr, "metric", "4000", check=False)
