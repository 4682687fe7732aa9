"""The one way tests and the bench start a `vqa-async serve` or a `vqa-async cluster` as real processes.

    srv = start_serve(model, "--max-batch-size", "4", keys={"alice": KEY}, log=tmp / "serve.log")
    try: ... srv.url ...
    finally: srv.stop()            # SIGTERM, then SIGKILL; every process it started is gone, or AssertionError

Both take any CLI flag, an environment, API keys (written to a keys file), TLS (a cert and key: the URL is https
and `ssl_context` trusts it), model faults (`Faults`: tests' sitecustomize in every worker), and a log file. They
wait for /readyz (TLS-aware; a cluster also until HAProxy sees every worker UP); a start that fails stops what it
started (supervisor, HAProxy, workers, spares) before it raises. `serve_command` and `cluster_command` are the only
places that spell those command lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULTS_DIR = Path(__file__).resolve().parent / "faults"  # the test-only sitecustomize (model faults, leaks)


def cli(exe: str | os.PathLike[str] | None = None) -> list[str]:
    """`vqa-async` as a command: an installed console script `exe`, else this interpreter's module."""
    return [str(exe)] if exe else [sys.executable, "-m", "vqa_async.cli"]


def serve_command(port: int, *flags: str, model: str | os.PathLike[str] | None = None, log_level: str | None = None,
                  exe: str | os.PathLike[str] | None = None) -> list[str]:
    """The one command line of `vqa-async serve` that tests and the bench run."""
    top = ["--log-level", log_level] if log_level else []
    return [*cli(exe), *top, "serve", "--port", str(port), *(["--model", str(model)] if model else []), *flags]


def cluster_command(port: int, runtime_dir: Path, *flags: str, workers: int = 2,
                    model: str | os.PathLike[str] | None = None, log_level: str | None = None,
                    exe: str | os.PathLike[str] | None = None) -> list[str]:
    """The one command line of `vqa-async cluster` that tests and the bench run."""
    top = ["--log-level", log_level] if log_level else []
    return [*cli(exe), *top, "cluster", "--workers", str(workers), "--port", str(port), "--runtime-dir",
            str(runtime_dir), *(["--model", str(model)] if model else []), *flags]


@dataclass
class Faults:
    """Model faults per worker port: {"<port>": "fail" | "hang" | "slow:<s>"}, read by the worker at each model
    call (vqa_async/testing/faults/sitecustomize.py). `leak_bytes`: every decoded upload leaks that much."""

    file: Path
    leak_bytes: int = 0

    def env(self) -> dict[str, str]:
        """The environment of a process that injects them (the file is created if missing)."""
        if not self.file.exists():
            self.set({})
        path = os.pathsep.join(p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "VQA_TEST_FAULT_FILE": str(self.file)}

    def set(self, faults: dict[int, str]) -> None:
        tmp = self.file.with_suffix(".tmp")
        leak = {"leak_bytes": self.leak_bytes} if self.leak_bytes else {}
        tmp.write_text(json.dumps({**{str(port): fault for port, fault in faults.items()}, **leak}))
        tmp.replace(self.file)

    def calls(self) -> list[int]:
        """The ports of the faulted model calls so far, in order (each is appended as the call begins)."""
        with contextlib.suppress(FileNotFoundError):
            return [int(x) for x in Path(f"{self.file}.calls").read_text().split()]
        return []


def children(pid: int) -> list[int]:
    """Every live descendant of `pid` (its own session's or not), from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def assert_gone(pids: Sequence[int], timeout: float = 10) -> None:
    """Every pid has ended (a SIGKILLed child's parent may take a moment to reap it)."""
    end = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    assert not left, f"processes left behind: {left}"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300,
               ssl_context: ssl.SSLContext | None = None, also: Callable[[], bool] | None = None,
               probe: bool = True) -> None:
    """Polls `url`/readyz until it answers 200 (and `also()` holds); raises if `proc` exits first or `timeout`
    passes. `probe=False`: `also()` alone, no request to `url` (a front whose rate limit would count them)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        if not probe and also is not None and also():
            return
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=2,
                                                                  context=ssl_context) as r:
            if probe and r.status == 200 and (also is None or also()):
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60, sig: int = signal.SIGTERM) -> int:
    """`sig` (SIGTERM), then SIGKILL after `timeout` s; whatever it started (its session's processes and any
    descendant elsewhere) is SIGKILLed after it and must be gone. Returns the exit code."""
    kids = children(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):  # whatever outlived its leader in its group
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in kids:
        with contextlib.suppress(ProcessLookupError):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert_gone(kids)
    return int(proc.returncode)


@dataclass
class Launched:
    """A started `serve` or `cluster`."""

    proc: subprocess.Popen[bytes]
    port: int
    url: str
    ssl_context: ssl.SSLContext | None = None
    log: Path | None = None
    access_log: Path | None = None
    keys: dict[str, str] = field(default_factory=dict)
    home: Path = field(default_factory=Path)  # its own files: keys, logs, a cluster's runtime dir
    exit_code: int | None = None

    def stop(self, timeout: float = 60, sig: int = signal.SIGTERM) -> int:
        """SIGTERM, then SIGKILL; asserts nothing it started is left. The exit code (also in `exit_code`)."""
        self.exit_code = stop_process(self.proc, timeout, sig)
        return self.exit_code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def access_lines(self) -> list[dict[str, Any]]:
        if not self.access_log or not self.access_log.exists():
            return []
        return [json.loads(x) for x in self.access_log.read_bytes().splitlines() if x.strip()]

    def header(self, name: str | None = None) -> dict[str, str]:
        """An Authorization header with key `name` (the first key by default)."""
        if not self.keys:
            return {}
        return {"Authorization": f"Bearer {self.keys[name] if name else next(iter(self.keys.values()))}"}


def _popen(cmd: list[str], env: dict[str, str] | None, log: Path | None, cwd: Path | None,
           inherit_output: bool, base_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else (None if inherit_output else subprocess.DEVNULL)  # noqa: SIM115
    try:  # its own session: a group stop reaches everything it forks in it
        base = os.environ if base_env is None else base_env
        return subprocess.Popen(cmd, env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
                                if log else out, cwd=cwd, start_new_session=True)
    finally:
        if log and out is not None and not isinstance(out, int):
            out.close()


def _prepare(home: Path, flags: list[str], keys: dict[str, str] | None, tls: tuple[Path, Path] | None,
             access_log: Path | str | None) -> tuple[list[str], ssl.SSLContext | None, Path | None]:
    ctx = None
    if keys:
        (home / "keys").write_text("".join(f"{name}:{key}\n" for name, key in keys.items()))
        flags += ["--api-keys", str(home / "keys")]
    if tls:
        flags += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        ctx = ssl.create_default_context(cafile=str(tls[0]))
    access = None
    if access_log is not None:
        flags += ["--access-log", str(access_log)]
        access = Path(access_log) if str(access_log) not in ("off", "-") else None
    return flags, ctx, access


def start_serve(model: str | os.PathLike[str] | None = None, *flags: str, port: int = 0,
                env: dict[str, str] | None = None, keys: dict[str, str] | None = None,
                tls: tuple[Path, Path] | None = None, faults: Faults | None = None,
                access_log: Path | str | None = "off", log: Path | None = None, log_level: str | None = None,
                exe: str | os.PathLike[str] | None = None, wrap: Sequence[str] = (), cwd: Path | None = None,
                home: Path | None = None, timeout: float = 300, ready: bool = True,
                inherit_output: bool = True, host: str = "127.0.0.1",
                ssl_context: ssl.SSLContext | None = None, base_env: dict[str, str] | None = None) -> Launched:
    """A `vqa-async serve` on a free port (or `port`), ready. `wrap`: a prefix that execs it (`ip netns exec NS`);
    `ready=False`: return at once (a test of how it starts or fails). `ssl_context`: https, with --tls-cert and
    --tls-key among `flags` (instead of `tls`)."""
    from vqa_async.cluster.supervisor import free_port

    home = home or Path(tempfile.mkdtemp(prefix="vqa-serve-"))
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    more, ctx, access = _prepare(home, list(flags), keys, tls, access_log)
    ctx = ssl_context or ctx
    cmd = [*wrap, *serve_command(port, *more, model=model, log_level=log_level, exe=exe)]
    proc = _popen(cmd, {**(faults.env() if faults else {}), **(env or {})}, log, cwd, inherit_output, base_env)
    srv = Launched(proc, port, f"{'https' if ctx else 'http'}://{host}:{port}", ctx, log, access, dict(keys or {}),
                   home)
    if ready:
        try:  # one that does not come up is stopped here, not left behind
            wait_ready(srv.url, proc, timeout, ctx)
        except BaseException:
            srv.stop(timeout=10)
            raise
    return srv


@dataclass
class Cluster(Launched):
    """A started `vqa-async cluster`: HAProxy in front of workers; its state in `runtime_dir`."""

    runtime_dir: Path = field(default_factory=Path)
    model: str | None = None
    exe: str | None = None

    @property
    def stats_url(self) -> str:  # HAProxy's stats page and Prometheus exporter (/metrics)
        return f"http://127.0.0.1:{self.port + 1}"

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads((self.runtime_dir / "state.json").read_text())
        return out

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.state()["workers"]]

    def pids(self) -> list[int]:
        """Every process its state names: workers, HAProxy, spares."""
        with contextlib.suppress(OSError, ValueError):
            st = self.state()
            return [p for p in [*self.worker_pids(), st.get("haproxy_pid"), *st.get("spare_pids", [])] if p]
        return []

    def server_status(self, field: str = "status") -> dict[str, str]:
        import asyncio

        from vqa_async.cluster.haproxy import RuntimeApi

        rows = asyncio.run(RuntimeApi(self.runtime_dir / "haproxy.sock").stats())
        return {name: str(row[field]) for name, row in rows.items()}

    def all_up(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            status = self.server_status()
            return bool(status) and all(s.startswith("UP") for s in status.values())
        return False

    def retried(self) -> int:
        """The retries and redispatches HAProxy counted over the workers so far (`show stat`'s wretr + wredis)."""
        return sum(int(a or 0) + int(b or 0) for a, b in zip(self.server_status("wretr").values(),
                                                             self.server_status("wredis").values()))

    def haproxy_counter(self, name: str) -> float:
        """A counter summed over its series on HAProxy's exporter (the stats port's /metrics), e.g.
        'haproxy_backend_retry_warnings_total' or 'haproxy_backend_redispatch_warnings_total'."""
        from vqa_async.testing.http import scrape

        return sum(v for k, v in scrape(self.stats_url + "/metrics").items() if k.split("{")[0] == name)

    def reload(self, *flags: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`vqa-async cluster reload` of this cluster, to the end."""
        return subprocess.run([*cli(self.exe), "cluster", "reload", "--port", str(self.port), "--runtime-dir",
                               str(self.runtime_dir), *flags], capture_output=True, text=True, timeout=timeout)

    def stop(self, timeout: float = 90, sig: int = signal.SIGTERM) -> int:
        named = self.pids()
        code = super().stop(timeout, sig)
        assert_gone(named)
        return code


def start_cluster(model: str | os.PathLike[str] | None = None, *flags: str, workers: int = 2, port: int = 0,
                  runtime_dir: Path | None = None, env: dict[str, str] | None = None,
                  keys: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None,
                  faults: Faults | None = None, access_log: Path | str | None = None, log: Path | None = None,
                  log_level: str | None = None, exe: str | os.PathLike[str] | None = None, cwd: Path | None = None,
                  home: Path | None = None, timeout: float = 300, ready: bool = True,
                  inherit_output: bool = True, ssl_context: ssl.SSLContext | None = None,
                  probe: bool = True, base_env: dict[str, str] | None = None) -> Cluster:
    """A `vqa-async cluster` of `workers` on a free port pair (the front, and HAProxy's stats at port + 1), ready:
    /readyz through the front answers 200 and HAProxy sees every worker UP (`probe=False`: HAProxy's view alone,
    nothing sent through the front). `base_env`: the environment `env` adds to (default: this process's)."""
    from vqa_async.cluster.supervisor import free_port_pair

    home = home or Path(tempfile.mkdtemp(prefix="vqa-cluster-"))
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port_pair()
    rdir = runtime_dir or home / "rt"
    more, ctx, access = _prepare(home, list(flags), keys, tls, access_log)
    ctx = ssl_context or ctx
    cmd = cluster_command(port, rdir, *more, workers=workers, model=model, log_level=log_level, exe=exe)
    proc = _popen(cmd, {**(faults.env() if faults else {}), **(env or {})}, log, cwd, inherit_output, base_env)
    cl = Cluster(proc, port, f"{'https' if ctx else 'http'}://127.0.0.1:{port}", ctx, log, access, dict(keys or {}),
                 home, runtime_dir=rdir, model=str(model) if model else None, exe=str(exe) if exe else None)
    if ready:
        try:  # one that does not come up is stopped here with all it started: supervisor, HAProxy, workers
            wait_ready(cl.url, proc, timeout, ctx, also=cl.all_up if workers else None, probe=probe)
        except BaseException:
            cl.stop(timeout=10)
            raise
    return cl
