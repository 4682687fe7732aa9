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


def reference_answers(cl: RunningCluster, n: int) -> list[str]:
    """The answers to easy_vqa_requests(n), in order, from the cluster's first worker directly (8 at a time:
    answers do not depend on the batch): what the answers through the front must equal."""
    import asyncio

    import aiohttp

    from bench.lib.loadgen import easy_vqa_requests
    from vqa_async.testing.http import multipart

    url = f"http://127.0.0.1:{cl.state()['workers'][0]['port']}/v1/vqa"

    async def ask_all() -> list[str]:
        gate = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as s:
            async def one(image: bytes, question: str) -> str:
                form = multipart(image, [question])
                async with gate, s.post(url, data=form.body, headers={"Content-Type": form.content_type}) as r:
                    assert r.status == 200, await r.text()
                    return str((await r.json())["answer"])

            return list(await asyncio.gather(*(one(i, q) for i, q in easy_vqa_requests(n))))

    return asyncio.run(ask_all())


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


