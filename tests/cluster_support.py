"""Starting and stopping a real `vqa-async cluster` (HAProxy + workers on the demo model) from tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vqa_async.cluster.haproxy import RuntimeApi
from vqa_async.cluster.supervisor import free_port_pair

FAULTS = Path(__file__).resolve().parent / "faults"  # the test-only sitecustomize that injects model faults


@dataclass
class RunningCluster:
    proc: subprocess.Popen[bytes]
    port: int
    runtime_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.runtime_dir / "state.json").read_text())

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.state()["workers"]]

    def server_status(self, field: str = "status") -> dict[str, str]:
        rows = asyncio.run(RuntimeApi(self.runtime_dir / "haproxy.sock").stats())
        return {name: str(row[field]) for name, row in rows.items()}

    def all_up(self) -> bool:
        return all(s.startswith("UP") for s in self.server_status().values())

    def reload(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vqa_async.cli", "cluster", "reload", "--port", str(self.port),
                               "--runtime-dir", str(self.runtime_dir), *args], capture_output=True, text=True,
                              timeout=timeout)


def cluster_command(port: int, rdir: Path, demo_dir: Path, *extra: str, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "vqa_async.cli", "cluster", "--workers", str(workers), "--port", str(port),
            "--model", str(demo_dir), "--runtime-dir", str(rdir), *extra]


def wait_until_serving(cl: RunningCluster, timeout: float = 240) -> RunningCluster:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert cl.proc.poll() is None, f"cluster exited with {cl.proc.returncode}"
        try:
            with urllib.request.urlopen(cl.url + "/readyz", timeout=2) as r:
                if r.status == 200 and cl.all_up():
                    return cl
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("cluster not ready")


def start_cluster(tmp_path: Path, demo_dir: Path, *extra: str, workers: int = 2, port: int = 0,
                  env: dict[str, str] | None = None, log_to: Path | None = None) -> RunningCluster:
    """`log_to`: the cluster's stdout and stderr (its workers' too) go to this file, for a test to read."""
    port = port or free_port_pair()  # the stats page takes port + 1
    rdir = tmp_path / "rt"
    out = open(log_to, "wb") if log_to else None  # noqa: SIM115 - the child holds its own copy
    try:
        proc = subprocess.Popen(cluster_command(port, rdir, demo_dir, *extra, workers=workers),
                                env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    finally:
        if out:
            out.close()
    return wait_until_serving(RunningCluster(proc, port, rdir))


def faulty_env(fault_file: Path) -> dict[str, str]:
    """Workers that read `fault_file` (see tests/faults/sitecustomize.py) at each model call."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "VQA_TEST_FAULT_FILE": str(fault_file)}


def set_faults(fault_file: Path, faults: dict[int, str]) -> None:
    tmp = fault_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(port): fault for port, fault in faults.items()}))
    tmp.replace(fault_file)


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def cluster_pids(cl: RunningCluster) -> list[int]:
    """Every process the cluster's state names: workers, HAProxy, spares."""
    state = cl.state()
    return [p for p in [*cl.worker_pids(), state.get("haproxy_pid"), *state.get("spare_pids", [])] if p]


def stop_cluster(cl: RunningCluster) -> None:
    pids = cluster_pids(cl)
    cl.proc.send_signal(signal.SIGTERM)
    try:
        assert cl.proc.wait(timeout=90) == 0
    finally:
        if cl.proc.poll() is None:
            cl.proc.kill()
    for pid in pids:  # no process left behind
        assert gone(pid), pid


def stop_process(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGTERM, and SIGKILL if it has not ended within 30 s: a test's own serve, never left behind."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
