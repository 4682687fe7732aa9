"""`vqa-async cluster`: N `vqa-async serve` workers behind HAProxy, kept alive, reloaded one at a time.

    start workers -> wait until each is ready -> render haproxy.cfg -> start HAProxy -> supervise
    each worker: one task owns its process (restart on exit or failed liveness, or when a reload asks)
    SIGHUP: passed on to every worker: they re-read their API keys and reopen their access logs, no restart
    SIGUSR2 (`vqa-async cluster reload`): rolling reload (drain through the runtime API, restart, re-enable), onto
            a new model if asked; if the first worker never becomes ready on it, it goes back to the last good
            model and the reload stops
    SIGTERM / SIGINT: HAProxy's soft stop (it answers what it holds), then the workers drain; a second one forces
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp

from vqa_async.cluster import haproxy, metrics_dir, reload, tls
from vqa_async.cluster.backends import DnsBackends
from vqa_async.cluster.children import SparePool, start_child
from vqa_async.cluster.liveness import Liveness
from vqa_async.cluster.reload import ReloadFailed
from vqa_async.cluster.runtime import prepare_dir, runtime_dir_for, write_atomic, write_json
from vqa_async.config import Settings

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that lived this long starts its backoff afresh
SICK_GRACE_S = 5.0  # a worker restarted by liveness gets this long to exit on SIGTERM before SIGKILL
TRIAL_WAIT_S = 30.0  # how long a worker that died on a model under trial waits for the reload to roll it back

__all__ = ["Cluster", "ClusterOptions", "ReloadFailed", "free_port", "free_port_pair", "runtime_dir_for",
           "serve_command"]


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
    unready_restart_s: float = 10.0  # liveness: restart a worker unready (or silent) this long
    spares: int = 1  # warm pre-imported processes waiting to replace a dead worker
    max_conn_per_source: int = 256  # 0: no limit
    rate_limit_per_source: float = 0.0  # requests/s per client address over 10 s; 0: no limit
    rate_limit: float = 0.0  # requests/s per client (its API key, else its address) over 10 s; 0: no limit
    tls_cert: str | None = None  # with tls_key: HAProxy terminates TLS on the front port
    tls_key: str | None = None


@dataclass
class Restart:
    """A request to a worker's owner: replace the process, onto `model`; `done` is set once it is spawned."""

    model: str | None
    grace_s: float
    done: asyncio.Future[asyncio.subprocess.Process]
    trial: bool = False  # the model is on trial: if the process dies before ready, wait for the reload's word


@dataclass
class Worker:
    index: int
    port: int
    device: str
    model: str | None  # what this worker loads; a reload changes it, a crash restart keeps it
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0
    seen_ready_pid: int | None = None  # the last process `_wait_ready` saw answer /readyz 200
    on_trial: tuple[str | None] | None = None  # (the previous model,) while a reload tries a model on this worker
    requests: asyncio.Queue[Restart] = field(default_factory=asyncio.Queue)

    @property
    def name(self) -> str:
        return f"w{self.index}"


async def _stop_process(proc: asyncio.subprocess.Process, grace_s: float, what: str) -> None:
    """SIGTERM (a worker answers what it holds, then exits), SIGKILL after `grace_s`."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        log.warning("%s (pid %d) did not stop in %.0f s; killing it", what, proc.pid, grace_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class Cluster:
    def __init__(self, options: ClusterOptions, serve: Settings) -> None:
        self.opt = options
        self.serve = serve
        self.good_model = serve.model  # the last model every worker was ready on: where failures go back to
        self.stats_port = options.stats_port or options.port + 1
        # Absolute: HAProxy reads a relative `stats socket` path as host:port and refuses the config.
        self.runtime_dir = prepare_dir(options.runtime_dir or runtime_dir_for(options.port))
        self.admin_socket = self.runtime_dir / "haproxy.sock"
        self.api = haproxy.RuntimeApi(self.admin_socket)
        devices = options.devices or [serve.device]
        self.workers = [Worker(i, free_port(), devices[i % len(devices)], serve.model)
                        for i in range(options.workers)]
        self.metrics_dir = metrics_dir.prepare(self.runtime_dir)
        self.worker_env = metrics_dir.worker_env(self.metrics_dir)
        # A spare only replaces local workers: none for a front whose workers all run elsewhere.
        self.spares = SparePool(options.spares if self.workers else 0, on_change=self._write_state,
                                env=self.worker_env)
        self.haproxy: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._owners: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    # -- workers ----------------------------------------------------------------------------------------------
    def _torch_threads(self) -> int:
        if self.serve.torch_threads:
            return self.serve.torch_threads
        on_cpu = [w for w in self.workers if w.device == "cpu"]
        # Workers x threads must not oversubscribe the cores.
        return max(1, (os.cpu_count() or 1) // max(1, len(on_cpu)))

    # Set per worker; every other serve setting is passed on as it is.
    PER_WORKER = frozenset({"host", "port", "unix_socket", "device", "torch_threads", "log_level", "model",
                            "worker_name"})

    def _worker_args(self, w: Worker) -> list[str]:
        """`vqa-async` arguments (after the program) of worker `w`."""
        args = ["--log-level", self.serve.log_level, "serve", "--host", "127.0.0.1", "--port", str(w.port),
                "--device", w.device, "--torch-threads", str(self._torch_threads()),
                # The access log names the worker as HAProxy's log and X-Served-By do (w0, w1, ...), not by pid.
                "--worker-name", w.name]
        if w.model is not None:
            args += ["--model", w.model]
        for f in fields(self.serve):
            value = getattr(self.serve, f.name)
            if f.name not in self.PER_WORKER and value is not None:
                args += ["--" + f.name.replace("_", "-"), str(value)]
        return args

    async def _spawn(self, w: Worker, warm: bool = True) -> asyncio.subprocess.Process:
        """Starts w's process: a warm spare if one waits, otherwise a fresh interpreter. Only w's owner (and the
        first start, before owners exist) calls this, so a worker never has two processes."""
        args = self._worker_args(w)
        proc = await self.spares.take(args) if warm else None
        how = "warm spare" if proc else "cold"
        if proc is None:
            proc = await start_child(*serve_command(), *args, env=self.worker_env, ignore_hup=True)
        self._keep(self._forget_metrics_on_exit(proc))
        w.proc = proc
        w.started_at = time.monotonic()
        log.info("worker %s started (%s): pid %d, port %d, %s, model %s", w.name, how, proc.pid, w.port, w.device,
                 w.model or "demo")
        self._write_state()
        return proc

    async def _forget_metrics_on_exit(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        metrics_dir.forget(proc.pid, self.metrics_dir)

    def _pass_on_hup(self) -> None:
        """SIGHUP: every worker re-reads its API keys and reopens its access log. A waiting spare has read
        nothing yet (it reads the keys file when it becomes a worker), and ignores SIGHUP meanwhile."""
        sent = []
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGHUP)
                    sent.append(w.name)
        log.info("SIGHUP passed on to workers %s: API keys re-read, access logs reopened", ", ".join(sent) or "none")

    async def _own(self, w: Worker) -> None:
        """The one task that owns w's process: restarts it when it exits or fails liveness (with exponential
        backoff if it keeps failing), and replaces it when a reload asks (`_restart`)."""
        while not self._stopping.is_set():
            assert w.proc is not None
            proc = w.proc
            waits: dict[str, asyncio.Future[Any]] = {
                "exit": asyncio.ensure_future(proc.wait()),
                "request": asyncio.ensure_future(w.requests.get()),
                "stop": asyncio.ensure_future(self._stopping.wait()),
                "sick": asyncio.ensure_future(self._liveness(w, proc)),
            }
            try:
                await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits.values():
                    t.cancel()
            if waits["request"].done() and not waits["request"].cancelled():
                await self._serve_request(w, waits["request"].result())
                continue
            if self._stopping.is_set():
                return
            if waits["sick"].done() and not waits["sick"].cancelled() and proc.returncode is None:
                log.warning("worker %s (pid %d) restarted: %s", w.name, proc.pid, waits["sick"].result())
                await _stop_process(proc, min(SICK_GRACE_S, self.serve.shutdown_timeout_s), f"worker {w.name}")
            lived = time.monotonic() - w.started_at
            w.failures = 0 if lived > STABLE_AFTER_S else w.failures + 1
            delay = min(BACKOFF_MAX_S, 0.5 * 2 ** max(0, w.failures - 2)) if w.failures > 1 else 0.0
            if w.on_trial:  # a reload is trying a model on it: the reload decides what comes next (a rollback)
                delay = TRIAL_WAIT_S
            log.warning("worker %s (pid %d) ended with %s after %.1f s; %s", w.name, proc.pid, proc.returncode, lived,
                        "the reload trying a model on it decides what next" if w.on_trial else
                        f"restarting in {delay:.1f} s")
            request = await self._backoff(w, delay)
            if self._stopping.is_set():
                return
            if request is not None:
                await self._serve_request(w, request)
            else:
                if w.on_trial:
                    log.warning("worker %s: nobody decided after its trial; back to %s", w.name, w.on_trial[0])
                    w.model = w.on_trial[0]
                    w.on_trial = None
                w.restarts += 1
                await self._spawn(w)  # HAProxy's health check puts it back in rotation once /readyz answers

    async def _backoff(self, w: Worker, delay: float) -> Restart | None:
        """Waits `delay`, or less if the cluster stops or a reload asks for a restart (returned)."""
        if delay <= 0:
            return None
        get = asyncio.ensure_future(w.requests.get())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([get, stop], timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()
            stop.cancel()
        return get.result() if get.done() and not get.cancelled() else None

    async def _serve_request(self, w: Worker, request: Restart) -> None:
        try:
            if w.proc is not None:
                await _stop_process(w.proc, request.grace_s, f"worker {w.name}")
            w.on_trial = (w.model,) if request.trial else None
            w.model = request.model
            w.failures = 0
            proc = await self._spawn(w)
        except BaseException as e:
            if not request.done.done():
                request.done.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
            raise
        if not request.done.done():
            request.done.set_result(proc)

    async def _restart(self, w: Worker, model: str | None, grace_s: float,
                       trial: bool = False) -> asyncio.subprocess.Process:
        """Asks w's owner to replace its process (onto `model`); returns the new process once it is spawned."""
        request = Restart(model, grace_s, asyncio.get_running_loop().create_future(), trial)
        w.requests.put_nowait(request)
        return await request.done

    async def _liveness(self, w: Worker, proc: asyncio.subprocess.Process) -> str:
        assert self._session is not None
        # A process the supervisor itself saw ready (at start, in a reload) counts as having been ready.
        return await Liveness(w.port, proc.pid, self.opt.unready_restart_s, self.opt.ready_timeout_s,
                              w.started_at, ready_seen=w.seen_ready_pid == proc.pid).watch(self._session)

    async def _wait_ready(self, w: Worker, proc: asyncio.subprocess.Process, timeout: float) -> None:
        """Until `proc` (w's process) answers /readyz 200; raises ReloadFailed if it exits, is replaced, or the
        timeout passes first."""
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{w.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < end:
                if proc.returncode is not None:
                    raise ReloadFailed(f"worker {w.name} exited with {proc.returncode} before it was ready "
                                       "(its error is in the cluster's log)")
                if w.proc is not proc:
                    raise ReloadFailed(f"worker {w.name} was replaced before it was ready")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url) as r:
                        if r.status == 200:
                            w.seen_ready_pid = proc.pid
                            return
                await asyncio.sleep(0.2)
        raise ReloadFailed(f"worker {w.name} not ready within {timeout:.0f} s")

    def _keep(self, coro: Any) -> None:
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
            hard_stop_after_s=self.serve.timeout_s + self.opt.queue_timeout_s + 10,
            max_conn_per_source=self.opt.max_conn_per_source,
            rate_limit_per_source=self.opt.rate_limit_per_source, rate_limit=self.opt.rate_limit,
            tls_pem=tls.write_pem(self.opt.tls_cert, self.opt.tls_key, self.runtime_dir)
            if self.opt.tls_cert and self.opt.tls_key else None,
            remote_servers=[haproxy.Server(f"remote{i}", b) for i, b in enumerate(self.opt.backends)],
            dns=self.opt.backend_dns,
            # The workers' summed metrics cover local workers only: with remote ones the front's /metrics is a
            # worker's own, as before (scrape each host).
            summed_metrics=bool(self.workers) and not self.opt.backends and self.opt.backend_dns is None)
        path = self.runtime_dir / "haproxy.cfg"
        write_atomic(path, cfg)
        return path

    def _write_state(self) -> None:
        write_json(self.runtime_dir / "state.json", {
            "pid": os.getpid(), "port": self.opt.port, "model": self.good_model,
            "admin_socket": str(self.admin_socket),
            "haproxy_pid": self.haproxy.pid if self.haproxy else None,
            "spare_pids": self.spares.pids, "spares_ready": self.spares.ready_pids,
            "workers": [{"name": w.name, "port": w.port, "device": w.device, "model": w.model,
                         "pid": w.proc.pid if w.proc else None, "restarts": w.restarts} for w in self.workers]})

    # -- rolling reload (reload.py) ------------------------------------------------------------------------------
    async def rolling_reload(self, model: str | None = None) -> None:
        await reload.rolling_reload(self, model)

    # -- lifetime ---------------------------------------------------------------------------------------------
    def _on_stop_signal(self) -> None:
        if self._stopping.is_set():
            log.warning("second stop signal: stopping now, without waiting for requests in flight")
            self._forced.set()
        self._stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._pass_on_hup)
        loop.add_signal_handler(signal.SIGUSR2, lambda: self._keep(reload.serve_requests(self)))
        self._session = aiohttp.ClientSession()
        try:
            cfg = self._render()
            await haproxy.check_config(cfg)  # a bad setting fails here, before a worker spends a model load
            for w in self.workers:
                await self._spawn(w, warm=False)
            starting = [self._wait_ready(w, w.proc, self.opt.ready_timeout_s) for w in self.workers if w.proc]
            waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.gather(*starting)),
                                               asyncio.ensure_future(self._stopping.wait())}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for t in waits:
                t.cancel()
            if self._stopping.is_set():
                return 0
            for t in done:
                t.result()  # a worker that could not start: the error says which and why
            self._owners = [asyncio.ensure_future(self._own(w)) for w in self.workers]
            self.haproxy = await haproxy.start(cfg)
            self.spares.fill()
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

    async def shutdown(self) -> None:
        """HAProxy's soft stop first (it stops listening and finishes what it holds), then the workers drain."""
        self._stopping.set()
        for t in list(self._tasks):  # reloads in progress
            t.cancel()
        await asyncio.gather(*self._owners, *self._tasks, return_exceptions=True)
        await self._stop_haproxy()
        grace = 0.0 if self._forced.is_set() else self.serve.shutdown_timeout_s + 5
        await asyncio.gather(*(self._stop_worker(w, grace) for w in self.workers),
                             self.spares.close())
        if self._session:
            await self._session.close()
        log.info("cluster stopped")

    async def _stop_haproxy(self) -> None:
        proc = self.haproxy
        if proc is None or proc.returncode is not None:
            return
        if not self._forced.is_set():
            proc.send_signal(signal.SIGUSR1)  # soft stop; its hard-stop-after bounds it
            done = asyncio.ensure_future(proc.wait())
            forced = asyncio.ensure_future(self._forced.wait())
            await asyncio.wait([done, forced], return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
        if proc.returncode is None:
            await _stop_process(proc, 5, "haproxy")

    async def _stop_worker(self, w: Worker, grace_s: float) -> None:
        if w.proc is None or w.proc.returncode is not None:
            return
        if grace_s <= 0:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()
            return
        await _stop_process(w.proc, grace_s, f"worker {w.name}")
