"""When the supervisor gives up on a worker process: the liveness rules on /healthz and /readyz, without processes."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from vqa_async.cluster.liveness import Liveness, is_stopped


def checks(bound_s: float = 10.0, ready_timeout_s: float = 300.0) -> Liveness:
    return Liveness(port=1, pid=1, bound_s=bound_s, ready_timeout_s=ready_timeout_s, started_at=0.0)


def test_a_loading_worker_is_given_its_ready_timeout() -> None:
    live = checks()
    for t in range(1, 300):  # refused connections while the model loads: not held against it
        assert live.observe(None, None, float(t)) is None
    assert "not ready within 300 s" in (live.observe(None, None, 300.0) or "")


def test_unready_after_ready_restarts_after_the_bound() -> None:
    live = checks(bound_s=10)
    assert live.observe(200, 200, 1.0) is None
    assert live.observe(200, 503, 2.0) is None
    assert live.observe(200, 503, 11.0) is None
    assert live.observe(200, 200, 11.5) is None  # ready again: the clock starts afresh
    assert live.observe(200, 503, 12.0) is None
    assert "not ready for 10 s" in (live.observe(200, 503, 22.0) or "")


def test_a_silent_or_failing_healthz() -> None:
    live = checks(bound_s=10)
    live.observe(200, 200, 1.0)
    assert live.observe(None, None, 2.0) is None
    assert "did not answer for 10 s" in (live.observe(None, None, 12.0) or "")
    live = checks()
    live.observe(200, 200, 1.0)
    assert live.observe(503, 503, 2.0) is None
    assert "answered 503 2 times" in (live.observe(503, 503, 3.0) or "")


def test_a_paused_worker_is_not_held_to_account() -> None:
    live = checks(bound_s=10)
    live.observe(200, 200, 1.0)
    live.observe(None, None, 2.0)
    live.paused()  # SIGSTOP: what it did not answer meanwhile does not count
    assert live.observe(None, None, 13.0) is None
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not is_stopped(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        end = time.monotonic() + 5
        while not is_stopped(proc.pid) and time.monotonic() < end:
            time.sleep(0.01)
        assert is_stopped(proc.pid)
    finally:
        proc.kill()
        proc.wait()
