"""`vqa-async cluster`: N `vqa-async serve` workers behind HAProxy, restarted when they die, reloaded one at a time.

    start workers -> wait until each is ready -> render haproxy.cfg -> start HAProxy -> supervise
    SIGHUP: rolling reload (drain through the runtime API, restart, re-enable), optionally onto a new model
    SIGTERM / SIGINT: stop HAProxy, then the workers (each answers what it holds), leaving no process behind
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp

from vqa_async.cluster import haproxy
from vqa_async.cluster.backends import DnsBackends, template_vars
from vqa_async.config import Settings

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that lived this long starts its backoff afresh


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A free port whose next port is free too: the cluster's front, and its stats page at port + 1."""
    while True:
        port = free_port(host)
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind((host, port + 1))
            return port


def runtime_dir_for(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"vqa-async-cluster-{port}"


def serve_command() -> list[str]:
    """`vqa-async serve` as `ps` will show it: the console script next to this Python, if installed."""
    script = Path(sys.executable).parent / "vqa-async"
    return [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "vqa_async.cli"]


@dataclass
class ClusterOptions:
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 8080
    stats_port: int = 0  # 0: port + 1
    devices: list[str] = field(default_factory=list)  # spread workers over these, round robin
    backends: list[str] = field(default_factory=list)  # HOST:PORT of `vqa-async serve` on other machines
    backend_dns: DnsBackends | None = None  # a DNS name listing such workers, re-resolved while running
    queue_timeout_s: float = 5.0
    server_maxconn: int = 0  # 0: twice the workers' max batch size
    runtime_dir: Path | None = None
    ready_timeout_s: float = 300.0
    haproxy_log: bool = False
    retry_body_bytes: int = haproxy.RETRYABLE_BODY_BYTES  # uploads up to this size survive a dying worker


@dataclass
class Worker:
    index: int
    port: int
    device: str
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    failures: int = 0
    expected_exit: bool = False

    @property
    def name(self) -> str:
        return f"w{self.index}"


class Cluster:
    def __init__(self, options: ClusterOptions, serve: Settings) -> None:
        self.opt = options
        self.serve = serve  # a rolling reload onto a new directory replaces its `model`
        self.stats_port = options.stats_port or options.port + 1
        # Absolute: HAProxy reads a relative `stats socket` path as host:port and refuses the config.
        self.runtime_dir = (options.runtime_dir or runtime_dir_for(options.port)).resolve()
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.admin_socket = self.runtime_dir / "haproxy.sock"
        self.api = haproxy.RuntimeApi(self.admin_socket)
        devices = options.devices or [serve.device]
        self.workers = [Worker(i, free_port(), devices[i % len(devices)]) for i in range(options.workers)]
        self.haproxy: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- workers ----------------------------------------------------------------------------------------------
    def _torch_threads(self) -> int:
        if self.serve.torch_threads:
            return self.serve.torch_threads
        on_cpu = [w for w in self.workers if w.device == "cpu"]
        # Workers x threads must not oversubscribe the cores.
        return max(1, (os.cpu_count() or 1) // max(1, len(on_cpu)))

    # Set per worker; every other serve setting is passed on as it is.
    PER_WORKER = frozenset({"host", "port", "unix_socket", "device", "torch_threads", "log_level"})

    def _worker_args(self, w: Worker) -> list[str]:
        args = serve_command() + ["--log-level", self.serve.log_level, "serve", "--host", "127.0.0.1",
                                  "--port", str(w.port), "--device", w.device,
                                  "--torch-threads", str(self._torch_threads())]
        for f in fields(self.serve):
            value = getattr(self.serve, f.name)
            if f.name not in self.PER_WORKER and value is not None:
                args += ["--" + f.name.replace("_", "-"), str(value)]
        return args

    async def _spawn(self, w: Worker) -> None:
        w.expected_exit = False
        w.proc = await asyncio.create_subprocess_exec(*self._worker_args(w))
        w.started_at = time.monotonic()
        log.info("worker %s started: pid %d, port %d, %s", w.name, w.proc.pid, w.port, w.device)
        self._write_state()

    async def _wait_ready(self, w: Worker, timeout: float) -> None:
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{w.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < end:
                if w.proc is None or w.proc.returncode is not None:
                    raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode if w.proc else '?'} "
                                       "before it was ready")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"worker {w.name} not ready within {timeout:.0f}s")

    async def _stop_worker(self, w: Worker, timeout: float) -> None:
        if w.proc is None or w.proc.returncode is not None:
            return
        w.expected_exit = True
        w.proc.terminate()  # SIGTERM: it answers what it holds, then exits
        try:
            await asyncio.wait_for(w.proc.wait(), timeout)
        except TimeoutError:
            log.warning("worker %s did not stop in %.0fs; killing it", w.name, timeout)
            w.proc.kill()
            await w.proc.wait()

    async def _watch(self, w: Worker) -> None:
        """Restarts the worker whenever it exits unexpectedly, with exponential backoff if it keeps dying."""
        while not self._stopping.is_set():
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping.is_set() or w.expected_exit:
                return
            lived = time.monotonic() - w.started_at
            w.failures = 0 if lived > STABLE_AFTER_S else w.failures + 1
            delay = min(BACKOFF_MAX_S, 0.5 * 2 ** max(0, w.failures - 1)) if w.failures else 0.0
            log.warning("worker %s (pid %d) exited with %s after %.1fs; restarting in %.1fs", w.name, w.proc.pid,
                        code, lived, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            await self._spawn(w)  # HAProxy's health check puts it back in rotation once /readyz answers

    def _keep(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- HAProxy ----------------------------------------------------------------------------------------------
    def _render(self) -> Path:
        servers = [haproxy.Server(w.name, f"127.0.0.1:{w.port}") for w in self.workers]
        cfg = haproxy.render(
            servers, host=self.opt.host, port=self.opt.port, stats_host="127.0.0.1",
            stats_port=self.stats_port, admin_socket=self.admin_socket,
            max_body_bytes=self.serve.max_body_bytes,
            server_maxconn=self.opt.server_maxconn or 2 * self.serve.max_batch_size,
            queue_timeout_s=self.opt.queue_timeout_s, server_timeout_s=self.serve.timeout_s + 5,
            log=self.opt.haproxy_log, retry_body_bytes=self.opt.retry_body_bytes,
            **template_vars(self.opt.backends, self.opt.backend_dns))
        path = self.runtime_dir / "haproxy.cfg"
        path.write_text(cfg)
        return path

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "port": self.opt.port, "model": self.serve.model,
                 "admin_socket": str(self.admin_socket),
                 "haproxy_pid": self.haproxy.pid if self.haproxy else None,
                 "workers": [{"name": w.name, "port": w.port, "device": w.device,
                              "pid": w.proc.pid if w.proc else None} for w in self.workers]}
        tmp = self.runtime_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.runtime_dir / "state.json")

    # -- rolling reload ---------------------------------------------------------------------------------------
    async def rolling_reload(self, model: str | None = None) -> None:
        async with self._reloading:
            if model:
                self.serve = self.serve.replace(model=model)
            log.info("rolling reload of %d workers%s", len(self.workers), f" onto {model}" if model else "")
            for w in self.workers:
                if self._stopping.is_set():
                    return
                await self.api.set_state(w.name, "drain")
                await self._wait_idle(w, timeout=self.serve.timeout_s + 5)
                await self._stop_worker(w, timeout=self.serve.shutdown_timeout_s + 5)
                await self._spawn(w)
                self._keep(self._watch(w))
                await self._wait_ready(w, self.opt.ready_timeout_s)
                await self.api.set_state(w.name, "ready")
                await self._wait_up(w, timeout=10)
                log.info("worker %s reloaded", w.name)
            log.info("rolling reload done")

    async def _wait_row(self, w: Worker, done: Callable[[dict[str, str]], bool], timeout: float) -> bool:
        """Polls HAProxy's stats row of `w` until `done(row)`; False if `timeout` passes first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if done((await self.api.stats()).get(w.name, {})):
                return True
            await asyncio.sleep(0.1)
        return False

    async def _wait_idle(self, w: Worker, timeout: float) -> None:
        if not await self._wait_row(w, lambda row: int(row.get("scur") or 0) == 0 and int(row.get("qcur") or 0) == 0,
                                    timeout):
            log.warning("worker %s still busy after %.0fs of draining", w.name, timeout)

    async def _wait_up(self, w: Worker, timeout: float) -> None:
        await self._wait_row(w, lambda row: row.get("status", "").startswith("UP"), timeout)

    # -- lifetime ---------------------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._keep(self._reload_from_request()))
        try:
            for w in self.workers:
                await self._spawn(w)
            await asyncio.gather(*(self._wait_ready(w, self.opt.ready_timeout_s) for w in self.workers))
            for w in self.workers:
                self._keep(self._watch(w))
            cfg = self._render()
            self.haproxy = await haproxy.start(cfg)
            self._write_state()
            log.info("cluster ready: http://%s:%d (%d workers); stats http://127.0.0.1:%d/stats, metrics /metrics",
                     self.opt.host, self.opt.port, len(self.workers), self.stats_port)
            waits = {asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(self.haproxy.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits:
                    t.cancel()
            if not self._stopping.is_set():  # then HAProxy exited
                log.error("haproxy exited with %s; stopping the cluster", self.haproxy.returncode)
                return 1
            return 0
        finally:
            await self.shutdown()

    async def _reload_from_request(self) -> None:
        request = self.runtime_dir / "reload.json"
        model = None
        if request.exists():
            model = json.loads(request.read_text()).get("model")
            request.unlink()
        try:
            await self.rolling_reload(model)
        except Exception:
            log.exception("rolling reload failed")

    async def shutdown(self) -> None:
        self._stopping.set()
        if self.haproxy and self.haproxy.returncode is None:
            self.haproxy.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.haproxy.wait(), 10)
            if self.haproxy.returncode is None:
                self.haproxy.kill()
                await self.haproxy.wait()
        await asyncio.gather(*(self._stop_worker(w, self.serve.shutdown_timeout_s + 5) for w in self.workers))
        for t in list(self._tasks):
            t.cancel()
        log.info("cluster stopped")


def request_reload(port: int, model: str | None = None, runtime_dir: Path | None = None) -> int:
    """`vqa-async cluster reload`: asks the running cluster on `port` for a rolling reload."""
    rdir = runtime_dir or runtime_dir_for(port)
    state_file = rdir / "state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"no cluster runs on port {port} (no {state_file})")
    pid = int(json.loads(state_file.read_text())["pid"])
    if model:
        (rdir / "reload.json").write_text(json.dumps({"model": str(Path(model).resolve())}))
    os.kill(pid, signal.SIGHUP)
    return pid
