"""`vqa-async cluster`: N `vqa-async serve` workers behind HAProxy, kept alive, reloaded one at a time.

    start workers -> wait until each is ready -> render haproxy.cfg -> start HAProxy -> supervise
    each worker: one task owns its process (workers.py: restart on exit or failed liveness, or when a reload asks)
    SIGHUP: passed on to every worker: they re-read their API keys and reopen their access logs, no restart
    SIGUSR2 (`vqa-async cluster reload`): rolling reload (reload.py: drain through the runtime API, restart,
            re-enable), onto a new model if asked; if the first worker never becomes ready on it, it goes back to
            the last good model and the reload stops
    SIGTERM / SIGINT: HAProxy's soft stop (it answers what it holds), then the workers drain; a second one forces

This process renders a config and watches children: it imports neither torch nor ModelScope
(tests/test_control_plane.py). The workers get their settings as one object (config.settings_env).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp

from vqa_async.cluster import haproxy, metrics_dir, tls
from vqa_async.cluster.children import Launcher, SparePool, serve_command
from vqa_async.cluster.options import ClusterOptions
from vqa_async.cluster.reload import Reloader, ReloadFailed, ReloadTiming
from vqa_async.cluster.runtime import prepare_dir, runtime_dir_for, write_atomic, write_json
from vqa_async.cluster.workers import SICK_GRACE_S, Patience, Worker, stop_process
from vqa_async.config import Settings
from vqa_async.core import image_ids

log = logging.getLogger(__name__)

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


def worker_settings(serve: Settings, options: ClusterOptions) -> list[Settings]:
    """Each local worker's settings: the cluster's, with its own address, device, threads and name."""
    devices = options.devices or [serve.device]
    placed = [devices[i % len(devices)] for i in range(options.workers)]
    # Workers x threads must not oversubscribe the cores.
    threads = serve.torch_threads or max(1, (os.cpu_count() or 1) // max(1, placed.count("cpu")))
    # The access log names the worker as HAProxy's log and X-Served-By do (w0, w1, ...), not by pid.
    return [serve.replace(host="127.0.0.1", port=free_port(), unix_socket=None, device=device, torch_threads=threads,
                          worker_name=f"w{i}") for i, device in enumerate(placed)]


class Cluster:
    def __init__(self, options: ClusterOptions, serve: Settings) -> None:
        self.opt = options
        self.serve = serve
        self.stats_port = options.stats_port or options.port + 1
        # Absolute: HAProxy reads a relative `stats socket` path as host:port and refuses the config.
        self.runtime_dir = prepare_dir(options.runtime_dir or runtime_dir_for(options.port))
        self.admin_socket = self.runtime_dir / "haproxy.sock"
        self.api = haproxy.RuntimeApi(self.admin_socket)
        self.metrics_dir = metrics_dir.prepare(self.runtime_dir)
        env = metrics_dir.worker_env(self.metrics_dir)
        # One secret for every worker, restarts and reloads included: they must give a key the same image ids.
        env[image_ids.SECRET_ENV] = env.get(image_ids.SECRET_ENV) or secrets.token_hex(32)
        # A spare only replaces local workers: none for a front whose workers all run elsewhere.
        self.spares = SparePool(options.spares if options.workers else 0, on_change=self.write_state, env=env)
        self.launcher = Launcher(self.spares, env, self.metrics_dir)
        patience = Patience(options.ready_timeout_s, options.unready_restart_s,
                            min(SICK_GRACE_S, serve.shutdown_timeout_s))
        self.workers = [Worker(i, s, self.launcher, patience, on_change=self.write_state)
                        for i, s in enumerate(worker_settings(serve, options))]
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self.reloader = Reloader(self.workers, self.api, self.runtime_dir,
                                 ReloadTiming(drain_s=serve.timeout_s + 5, stop_grace_s=serve.shutdown_timeout_s + 5,
                                              ready_timeout_s=options.ready_timeout_s),
                                 serve.model, self._stopping, on_change=self.write_state)
        self.haproxy: asyncio.subprocess.Process | None = None
        self._owners: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def render(self) -> Path:
        """HAProxy's config for these options, written to the runtime directory."""
        opt = self.opt
        servers = [haproxy.Server(w.name, f"127.0.0.1:{w.port}") for w in self.workers]
        cfg = haproxy.render(
            servers, host=opt.host, port=opt.port, stats_host="127.0.0.1",
            stats_port=self.stats_port, admin_socket=self.admin_socket,
            max_body_bytes=self.serve.max_body_bytes,
            server_maxconn=opt.server_maxconn or 2 * self.serve.max_batch_size,
            queue_timeout_s=opt.queue_timeout_s, server_timeout_s=self.serve.timeout_s + 5,
            log=opt.haproxy_log, retry_body_bytes=opt.retry_body_bytes,
            hard_stop_after_s=self.serve.timeout_s + opt.queue_timeout_s + 10,
            max_conn_per_source=opt.max_conn_per_source,
            rate_limit_per_source=opt.rate_limit_per_source, rate_limit=opt.rate_limit,
            tls_pem=tls.write_pem(opt.tls_cert, opt.tls_key, self.runtime_dir)
            if opt.tls_cert and opt.tls_key else None,
            remote_servers=[haproxy.Server(f"remote{i}", b) for i, b in enumerate(opt.backends)],
            dns=opt.backend_dns,
            # The workers' summed metrics cover local workers only: with remote ones the front's /metrics is a
            # worker's own, as before (scrape each host).
            summed_metrics=bool(self.workers) and not opt.backends and opt.backend_dns is None)
        path = self.runtime_dir / "haproxy.cfg"
        write_atomic(path, cfg)
        return path

    def write_state(self) -> None:
        """state.json: what `cluster reload` checks before it signals us, and what tests and operators read."""
        write_json(self.runtime_dir / "state.json", {
            "pid": os.getpid(), "port": self.opt.port, "model": self.reloader.model,
            "admin_socket": str(self.admin_socket),
            "haproxy_pid": self.haproxy.pid if self.haproxy else None,
            "spare_pids": self.spares.pids, "spares_ready": self.spares.ready_pids,
            "workers": [w.state() for w in self.workers]})

    async def rolling_reload(self, model: str | None = None) -> None:
        await self.reloader.rolling_reload(model)

    def _pass_on_hup(self) -> None:
        """SIGHUP: every worker re-reads its API keys and reopens its access log. A waiting spare has read
        nothing yet (it reads the keys file when it becomes a worker), and ignores SIGHUP meanwhile."""
        sent = [w.name for w in self.workers if w.hup()]
        log.info("SIGHUP passed on to workers %s: API keys re-read, access logs reopened", ", ".join(sent) or "none")

    def _keep(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        loop.add_signal_handler(signal.SIGUSR2, lambda: self._keep(self.reloader.serve_requests()))
        session = aiohttp.ClientSession()
        try:
            cfg = self.render()
            await haproxy.check_config(cfg)  # a bad setting fails here, before a worker spends a model load
            for w in self.workers:
                await w.start()
            starting = asyncio.gather(*(w.ready() for w in self.workers))
            waits: set[asyncio.Future[Any]] = {starting, asyncio.ensure_future(self._stopping.wait())}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for t in waits:
                t.cancel()
            if self._stopping.is_set():
                return 0
            for t in done:
                t.result()  # a worker that could not start: the error says which and why
            self._owners = [asyncio.ensure_future(w.supervise(self._stopping, session)) for w in self.workers]
            self.haproxy = await haproxy.start(cfg)
            self.spares.fill()
            self.write_state()
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
            await session.close()

    async def shutdown(self) -> None:
        """HAProxy's soft stop first (it stops listening and finishes what it holds), then the workers drain."""
        self._stopping.set()
        for t in list(self._tasks):  # reloads in progress
            t.cancel()
        await asyncio.gather(*self._owners, *self._tasks, return_exceptions=True)
        await self._stop_haproxy()
        grace = 0.0 if self._forced.is_set() else self.serve.shutdown_timeout_s + 5
        await asyncio.gather(*(w.stop(grace) for w in self.workers), self.launcher.close())
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
            await stop_process(proc, 5, "haproxy")
