"""`vqa-async cluster reload`: asks the running cluster for a rolling reload and waits for its outcome.

The request goes through the cluster's private runtime directory (a file naming the model, then SIGUSR2 to the
PID in state.json, once that PID is checked to be this cluster); the supervisor answers in a result file with
the request's id. Exit 0: every worker runs the new model; 1: the reload failed and the reason is printed
(the workers kept the last good model); 2: nothing was asked (no such cluster, a bad directory).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from vqa_async.cluster.runtime import (
    RuntimeDirError,
    check_dir,
    is_cluster_process,
    read_json,
    runtime_dir_for,
    write_json,
)
from vqa_async.model.files import WEIGHTS_NAME

RELOAD_WAIT_S = 900.0  # `cluster reload --wait-s`: how long it waits for the outcome


class NoCluster(RuntimeError):
    pass


@dataclass
class ReloadOutcome:
    pid: int
    ok: bool
    reason: str
    model: str | None


def cluster_pid(port: int, rdir: Path) -> int:
    """The PID of the cluster on `port` that owns `rdir`, checked: our directory, our file, our process."""
    state_file = rdir / "state.json"
    if not state_file.exists():
        raise NoCluster(f"no cluster runs on port {port} (no {state_file})")
    check_dir(rdir)
    state = read_json(state_file)
    pid, state_port = int(state["pid"]), int(state["port"])
    if state_port != port:
        raise NoCluster(f"{state_file} is the cluster on port {state_port}, not {port}")
    if not is_cluster_process(pid, port):
        raise RuntimeDirError(f"PID {pid} in {state_file} is not `vqa-async cluster` on port {port} "
                              "(a stale or forged state file): not signalling it")
    return pid


def request_reload(port: int, model: str | None = None, runtime_dir: Path | None = None,
                   wait_s: float = RELOAD_WAIT_S) -> ReloadOutcome:
    rdir = runtime_dir or runtime_dir_for(port)
    pid = cluster_pid(port, rdir)
    if model:
        path = Path(model).resolve()
        if not (path / WEIGHTS_NAME).is_file():
            raise NoCluster(f"{model} is not a serving directory (no {WEIGHTS_NAME}): nothing was changed")
        model = str(path)
    rid = uuid.uuid4().hex
    write_json(rdir / f"reload-request-{rid}.json", {"id": rid, "model": model})
    os.kill(pid, signal.SIGUSR2)  # not SIGHUP: that one only has the workers re-read their keys and logs
    result_file = rdir / f"reload-result-{rid}.json"
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if result_file.exists():
            result = read_json(result_file)
            with contextlib.suppress(OSError):
                result_file.unlink()
            return ReloadOutcome(pid, bool(result["ok"]), str(result.get("reason") or ""), result.get("model"))
        if not Path(f"/proc/{pid}").exists():
            return ReloadOutcome(pid, False, f"the cluster (pid {pid}) exited during the reload", None)
        time.sleep(0.2)
    return ReloadOutcome(pid, False, f"no outcome within {wait_s:.0f} s (the reload may still be running)", None)
