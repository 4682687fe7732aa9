"""One metrics view for the cluster: prometheus-client's multiprocess mode in the cluster's runtime directory.

Every local worker (and spare: the variable must be set before prometheus-client is imported) gets
PROMETHEUS_MULTIPROC_DIR=RUNTIME_DIR/metrics, so each process writes its samples to files of its own there. Each
worker's own `/metrics` stays per process (the bench reads the workers one by one and sums itself); any worker
serves the sum over every file on `/metrics/cluster` (vqa_async/metrics.py), where HAProxy sends the front's
`/metrics`.

The files of a worker that exited stay: its counters and histograms still count in the sum, so the sum never goes
back when a worker is restarted or reloaded (a new process starts from zero beside them). Only its live gauges
(`vqa_queue_depth`, `vqa_batch_cap`) are removed, by `forget`. The directory is emptied when the cluster starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from vqa_async.metrics import MULTIPROC_ENV


def prepare(runtime_dir: Path) -> Path:
    """RUNTIME_DIR/metrics, emptied: counts of a previous run of this cluster must not add to this one's."""
    path = runtime_dir / "metrics"
    if path.is_symlink():  # the runtime directory is private (runtime.py), so only we could have put it there
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path, 0o700)
    return path


def worker_env(path: Path) -> dict[str, str]:
    return {**os.environ, MULTIPROC_ENV: str(path)}


def forget(pid: int, path: Path) -> None:
    """A worker exited: its live gauges leave the sum; its counters stay in it."""
    mark_process_dead(pid, str(path))
