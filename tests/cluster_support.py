"""The tests' names for the one launcher (vqa_async/testing/launch.py): a real `vqa-async cluster` (HAProxy +
workers on the demo model), model faults, and a stop that leaves nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vqa_async.testing import launch
from vqa_async.testing.launch import FAULTS_DIR as FAULTS  # noqa: F401 - the test-only sitecustomize
from vqa_async.testing.launch import Cluster as RunningCluster
from vqa_async.testing.launch import Faults, alive, wait_ready

__all__ = ["RunningCluster", "Faults", "start_cluster", "stop_cluster", "stop_process", "faulty_env", "set_faults",
           "cluster_command", "cluster_pids", "gone", "wait_until_serving"]


def cluster_command(port: int, rdir: Path, demo_dir: Path, *extra: str, workers: int = 2) -> list[str]:
    return launch.cluster_command(port, rdir, *extra, workers=workers, model=demo_dir)


def wait_until_serving(cl: RunningCluster, timeout: float = 240) -> RunningCluster:
    wait_ready(cl.url, cl.proc, timeout, cl.ssl_context, also=cl.all_up)
    return cl


def start_cluster(tmp_path: Path, demo_dir: Path, *extra: str, workers: int = 2, port: int = 0,
                  env: dict[str, str] | None = None, log_to: Path | None = None) -> RunningCluster:
    """`log_to`: the cluster's stdout and stderr (its workers' too) go to this file, for a test to read."""
    return launch.start_cluster(demo_dir, *extra, workers=workers, port=port, env=env, log=log_to, home=tmp_path,
                                timeout=240)


def faulty_env(fault_file: Path) -> dict[str, str]:
    """Workers that read `fault_file` (see vqa_async/testing/faults/sitecustomize.py) at each model call."""
    return Faults(fault_file).env()


def set_faults(fault_file: Path, faults: dict[int, str]) -> None:
    Faults(fault_file).set(faults)


def gone(pid: int) -> bool:
    return not alive(pid)


def cluster_pids(cl: RunningCluster) -> list[int]:
    """Every process the cluster's state names: workers, HAProxy, spares."""
    return cl.pids()


def stop_cluster(cl: RunningCluster) -> None:
    """SIGTERM, then SIGKILL; it exits 0 and no process of it is left."""
    assert cl.stop() == 0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `timeout` s: a test's own process, never left behind."""
    launch.stop_process(proc, timeout)


