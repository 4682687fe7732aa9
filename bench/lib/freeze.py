"""A fair bench: while one system is measured, every other system of the run is frozen (SIGSTOP) and uses no CPU.

Idle, LitServe's processes poll (a quarter of a core on the 2-core box), so a row taken while they run is taken
with less CPU than theirs. `frozen(others)` stops every process of each other system (its leader and all its
descendants: the cluster's workers and HAProxy run in sessions of their own, so a process group is not enough),
yields a meter of the CPU they used meanwhile (from /proc: it must read ~0), and thaws them after the row. A
system is frozen leader first (the cluster's supervisor sees no stopped worker) and thawed leader last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    fields = _stat(pid) if pid else None
    return (int(fields[11]) + int(fields[12])) / TICK if fields else 0.0


def tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc's parent links), root first, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo += sorted(children.get(pid, []))
    return out


def tree_cpu(pids: Iterable[int]) -> float:
    return sum(proc_cpu(p) for p in pids)


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_stopped(pids: list[int], within_s: float = 2.0) -> None:
    """SIGSTOP is delivered asynchronously: wait until every process that still exists shows as stopped."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        states = [f[0] for f in map(_stat, pids) if f]
        if all(s in ("T", "t", "Z", "X") for s in states):  # stopped, or a zombie that will never stop
            return
        time.sleep(0.01)


@contextlib.contextmanager
def frozen(leaders: Iterable[int]) -> Iterator[Callable[[], float]]:
    """Freezes the process trees of `leaders` for the block; yields a function that returns the CPU seconds
    they used since the block began (the processes of the trees as frozen; ~0 when the freeze holds)."""
    trees = [tree(p) for p in leaders]
    pids = [p for t in trees for p in t]
    cpu0 = tree_cpu(pids)
    try:
        for t in trees:
            _signal(t, signal.SIGSTOP)
        _wait_stopped(pids)
        yield lambda: round(tree_cpu(pids) - cpu0, 3)
    finally:
        for t in trees:
            _signal(reversed(t), signal.SIGCONT)
