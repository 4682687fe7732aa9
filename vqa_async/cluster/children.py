"""The supervisor's children: they die with it, and a warm spare waits with its imports already paid for.

Every child (HAProxy, workers, spares) is started with PR_SET_PDEATHSIG, so that a supervisor killed with
SIGKILL (OOM killer, `kill -9`) takes them along instead of leaving them holding the port and, on a GPU, its
memory. The kernel sends the signal when the *thread* that forked the child exits: children are forked from
the event loop's thread, which is the main thread. Each child also gets its own session, so that Ctrl-C in a
terminal reaches the supervisor alone, which then stops them in order (HAProxy first).

A new `vqa-async serve` spends most of its start importing torch and ModelScope; the model itself maps in a
fraction of that. The spare (`python -m vqa_async.cluster.spare`) imports everything and waits on its stdin;
when a worker dies the supervisor writes it that worker's settings and it loads the model at once.

A worker's settings travel as one object, its `VQA_*` variables (config.settings_env): in the environment of a
worker started cold (`vqa-async serve`), as one JSON line on a spare's stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vqa_async.cluster import metrics_dir
from vqa_async.config import Settings, settings_env

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
REFILL_DELAY_S = 3.0
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork


def die_with_parent(sig: int = signal.SIGKILL, ignore_hup: bool = False) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when its parent dies (and exits at once if that already happened).
    `ignore_hup`: the child starts with SIGHUP ignored, so that a SIGHUP passed on while it is still importing or
    loading (before `serve` sets its handler) cannot kill it; the disposition survives exec."""
    parent = os.getpid()

    def preexec() -> None:
        if ignore_hup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


async def start_child(*argv: str, ignore_hup: bool = False, **kwargs: Any) -> asyncio.subprocess.Process:
    """A child that dies with us, in its own session. SIGKILL: a worker draining for its full timeout, or one
    whose model thread hangs, must not outlive the supervisor by more than a moment."""
    return await asyncio.create_subprocess_exec(*argv, preexec_fn=die_with_parent(ignore_hup=ignore_hup),
                                                start_new_session=True, **kwargs)


class SparePool:
    """Keeps `size` pre-imported `vqa-async` processes waiting; `take` hands one out and starts a replacement."""

    def __init__(self, size: int, on_change: Callable[[], None] = lambda: None,
                 env: dict[str, str] | None = None) -> None:
        self.size = size
        self.env = env  # a worker's environment (the metrics directory): it must be there before the imports
        self.on_change = on_change  # the supervisor records its spares' pids in state.json
        self._spares: list[asyncio.subprocess.Process] = []
        self._ready: set[int] = set()  # pids of spares whose imports are done
        self._watchers: set[asyncio.Task[None]] = set()
        self._filling: asyncio.Task[None] | None = None
        self._closed = False

    def fill(self, delay_s: float = 0.0) -> None:
        if self._closed or self.size <= 0 or (self._filling and not self._filling.done()):
            return
        self._filling = asyncio.ensure_future(self._fill(delay_s))

    async def _fill(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while not self._closed and len(self._alive()) < self.size:
            proc = await start_child(sys.executable, "-m", "vqa_async.cluster.spare", stdin=asyncio.subprocess.PIPE,
                                     stdout=asyncio.subprocess.PIPE, env=self.env, ignore_hup=True)
            if self._closed:  # closed while it was being started
                proc.kill()
                await proc.wait()
                return
            self._spares.append(proc)
            log.info("warm spare started: pid %d", proc.pid)
            self.on_change()
            watcher = asyncio.ensure_future(self._await_ready(proc))
            self._watchers.add(watcher)  # the loop keeps only weak references to tasks
            watcher.add_done_callback(self._watchers.discard)

    async def _await_ready(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(Exception):
            if (await proc.stdout.readline()).strip() == b"ready" and proc in self._spares:
                self._ready.add(proc.pid)
                log.info("warm spare ready: pid %d", proc.pid)
                self.on_change()
            await proc.stdout.read()  # EOF: it handed stdout over to stderr

    def _alive(self) -> list[asyncio.subprocess.Process]:
        self._spares = [p for p in self._spares if p.returncode is None]
        self._ready &= {p.pid for p in self._spares}
        self._spares.sort(key=lambda p: p.pid not in self._ready)  # the ready ones first
        return self._spares

    async def take(self, env: dict[str, str]) -> asyncio.subprocess.Process | None:
        """A spare serving with the settings `env` (VQA_* variables), or None if there is none (the caller
        starts one cold)."""
        while self._alive():
            proc = self._spares.pop(0)
            self._ready.discard(proc.pid)
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(env).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):  # it died meanwhile: try the next, or start cold
                continue
            finally:
                # Later: the new spare's imports would compete for the CPU with the model load just asked for.
                self.fill(REFILL_DELAY_S)
            return proc
        self.fill()
        return None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._alive()]

    @property
    def ready_pids(self) -> list[int]:
        return [p.pid for p in self._alive() if p.pid in self._ready]

    async def close(self) -> None:
        self._closed = True
        if self._filling:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filling
        for proc in self._alive():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self._spares.clear()


def serve_command() -> list[str]:
    """`vqa-async` as `ps` will show it: the console script next to this Python, if installed."""
    script = Path(sys.executable).parent / "vqa-async"
    return [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "vqa_async.cli"]


class Launcher:
    """Starts a worker's `vqa-async serve`: a warm spare if one waits, else a fresh interpreter. Every local worker
    writes its metrics into the cluster's metrics directory, whose files for a process are marked dead when it
    exits."""

    def __init__(self, spares: SparePool, env: dict[str, str], metrics: Path) -> None:
        self.spares = spares
        self.env = env  # the supervisor's environment with the metrics directory
        self.metrics = metrics
        self._watchers: set[asyncio.Task[None]] = set()

    async def start(self, settings: Settings, warm: bool = True) -> tuple[asyncio.subprocess.Process, str]:
        """The process and how it was started ("warm spare" or "cold")."""
        env = settings_env(settings)
        proc = await self.spares.take(env) if warm else None
        how = "warm spare" if proc else "cold"
        if proc is None:
            proc = await start_child(*serve_command(), "serve", env={**self.env, **env}, ignore_hup=True)
        watcher = asyncio.ensure_future(self._forget_metrics_on_exit(proc))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return proc, how

    async def _forget_metrics_on_exit(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        metrics_dir.forget(proc.pid, self.metrics)

    async def close(self) -> None:
        """After the workers stopped: the spares go, and nothing is left watching."""
        for t in list(self._watchers):
            t.cancel()
        await asyncio.gather(*self._watchers, self.spares.close(), return_exceptions=True)
