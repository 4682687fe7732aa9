"""The bench's one system launcher: every system it compares, started the same way.

- `baseline`: the tutorial's way, one request at a time (bench/baseline.py);
- `serve`: one `vqa-async serve`; `serve-exact`: the same with `--exact-preprocess` (Pillow decodes every pixel);
- `cluster`: `vqa-async cluster` (N workers behind HAProxy);
- `litserve`: the same model layer behind LitServe, decoding as a LitServe user writes it (Pillow, every pixel);
  `litserve-fast`: the same with our upload path (`vqa_async.model.preprocess`), so that the serving design and
  the upload path are measured apart (bench/litserve_vqa.py);
- `ceiling`: the bare model in this process on pre-processed pixels, no HTTP: model-only rows.

Each starts on free loopback ports, in its own session (stopped as a group: nothing is left behind), and is
waited for until ready. Every process gets the same thread settings: `--torch-threads N` torch threads each
(0: the cores divided by the system's model processes, as `vqa-async cluster` divides them) and the same
OMP_WAIT_POLICY (PASSIVE by default: idle OpenMP threads sleep instead of spinning against the event loop).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib.loadgen import percentile
from bench.lib.workloads import Picture
from vqa_async.testing.launch import (
    Cluster,
    Launched,
    cluster_command,
    serve_command,
    start_cluster,
    start_serve,
    stop_process,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("baseline", "serve", "serve-exact", "cluster", "ceiling", "litserve", "litserve-fast")
CEILING_MIN_S = 3.0


@dataclass
class Setup:
    """What every system of a run shares."""

    model: str | None = None
    device: str = "cpu"
    decoder: str = "fast"
    workers: int = 2  # the cluster's workers and LitServe's
    max_batch_size: int = 0  # 0: serve's default (16 on CPU)
    torch_threads: int = 0  # per model process; 0: the cores divided by the system's model processes
    omp_wait_policy: str = "PASSIVE"
    serve_flags: list[str] = field(default_factory=list)  # any other serve flag, for serve and cluster
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vqa-bench-logs-")))

    def threads(self, processes: int) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 1) // processes)

    def env(self) -> dict[str, str]:
        return {**os.environ, "OMP_WAIT_POLICY": self.omp_wait_policy}


@dataclass
class System:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None
    metrics_urls: list[str] = field(default_factory=list)
    state: dict[str, Any] | None = None  # the cluster's state.json: its pids and ports
    runtime_dir: Path | None = None  # the cluster's
    term_group: bool = False  # SIGTERM goes to the whole group (LitServe's workers), not the leader alone

    def stop(self) -> None:
        """SIGTERM to the leader (to its whole group for LitServe's workers), SIGKILL after 60 s, and whatever it
        started SIGKILLed after it (vqa_async.testing.launch.stop_process)."""
        if self.proc is not None:
            if self.term_group and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
            stop_process(self.proc, timeout=60)
        with contextlib.suppress(ValueError):
            RUNNING.remove(self)


RUNNING: list[System] = []


def stop_all() -> None:
    for s in list(RUNNING):
        s.stop()


def command(name: str, setup: Setup, port: int, extra: list[str], runtime_dir: Path | None = None) -> list[str]:
    model = ["--model", setup.model] if setup.model else []
    if name == "baseline":
        return [sys.executable, "-m", "bench.baseline", "--port", str(port), "--device", setup.device,
                "--torch-threads", str(setup.threads(1)), *model]
    if name in ("litserve", "litserve-fast"):
        return [sys.executable, "-m", "bench.litserve_vqa", "--port", str(port), "--device", setup.device,
                "--max-batch-size", str(setup.max_batch_size or 16), "--workers-per-device", str(setup.workers),
                "--torch-threads", str(setup.threads(setup.workers)),
                "--decode", "fast" if name == "litserve-fast" else "pillow", *model]
    model, rest = launcher_flags(name, setup, extra)
    if name in ("serve", "serve-exact"):
        return serve_command(port, *rest, model=model, exe=_exe())
    if name == "cluster":
        assert runtime_dir is not None
        return cluster_command(port, runtime_dir, *rest, workers=setup.workers, model=model, exe=_exe())
    raise ValueError(f"unknown system {name!r}: expected one of {', '.join(SYSTEMS)}")


def _exe() -> Path | None:
    """`vqa-async` as `ps` shows it: the console script beside this Python, where installed."""
    script = Path(sys.executable).parent / "vqa-async"
    return script if script.exists() else None


def launcher_flags(name: str, setup: Setup, extra: list[str]) -> tuple[str | None, list[str]]:
    """serve's and cluster's model, and their other flags."""
    batch = ["--max-batch-size", str(setup.max_batch_size)] if setup.max_batch_size else []
    threads = setup.threads(setup.workers if name == "cluster" else 1)
    exact = ["--exact-preprocess"] if name == "serve-exact" else []
    return setup.model, ["--torch-threads", str(threads), *exact, "--device", setup.device, "--decoder",
                         setup.decoder, "--access-log", "off", *batch, *setup.serve_flags, *extra]


def start(name: str, setup: Setup, extra: list[str] | None = None, label: str | None = None,
          ssl_context: ssl.SSLContext | None = None) -> System:
    """Starts system `name` (serve and cluster with `extra` serve flags too) and waits until it is ready.
    `label`: the name its rows carry (default `name`). `ssl_context`: the system answers https (`extra` holds
    its --tls-cert and --tls-key), checked with this context."""
    from vqa_async.cluster.supervisor import free_port

    setup.log_dir.mkdir(parents=True, exist_ok=True)
    log = setup.log_dir / f"{label or name}.log"
    if name in ("serve", "serve-exact", "cluster"):  # the one launcher that the tests use too
        model, rest = launcher_flags(name, setup, list(extra or []))
        if name == "cluster":
            up: Launched = start_cluster(model, *rest, workers=setup.workers, env=setup.env(), log=log, cwd=ROOT,
                                         exe=_exe(), timeout=600, ssl_context=ssl_context)
        else:
            up = start_serve(model, *rest, env=setup.env(), log=log, cwd=ROOT, exe=_exe(), timeout=600,
                             ssl_context=ssl_context)
        sysm = System(label or name, up.url, up.proc)
        if isinstance(up, Cluster):
            sysm.runtime_dir, sysm.state = up.runtime_dir, up.state()
            sysm.metrics_urls = [f"http://127.0.0.1:{w['port']}/metrics" for w in sysm.state["workers"]]
        else:
            sysm.metrics_urls = [sysm.url + "/metrics"]
        RUNNING.append(sysm)
        return sysm
    port = free_port()
    with open(log, "ab") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(command(name, setup, port, list(extra or [])), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT, env=setup.env())
    scheme = "https" if ssl_context is not None else "http"
    sysm = System(label or name, f"{scheme}://127.0.0.1:{port}", proc, term_group=name.startswith("litserve"))
    RUNNING.append(sysm)
    try:  # a system that does not come up is stopped here, not left behind
        wait_ready(sysm.url, proc, timeout=600, ssl_context=ssl_context)
    except BaseException:
        sysm.stop()
        raise
    return sysm


class Ceiling:
    """The bare model on pre-processed batches: no HTTP, no queue, no decoding of uploads, no cache. Every
    question is about its own image (the vision encoder runs once per question), at batch size min(concurrency,
    max batch). Its rows are model-only: they carry counted batch sizes, compute times in columns of their own,
    and counted failures."""

    name = "ceiling"

    def __init__(self, setup: Setup, pictures: list[Picture]) -> None:
        import torch

        from vqa_async.config import Settings
        from vqa_async.model.answer import Answerer
        from vqa_async.model.loader import load_model
        from vqa_async.model.preprocess import UploadPixels

        torch.set_num_threads(setup.threads(1))
        settings = Settings(model=setup.model, device=setup.device, decoder=setup.decoder,
                            max_batch_size=setup.max_batch_size)
        self.max_batch_size = settings.max_batch_size
        self.loaded = load_model(setup.model, device=settings.device)
        self.answerer = Answerer(self.loaded.model, self.loaded.tokenizer, self.loaded.device, self.loaded.dtype,
                                 decoder=setup.decoder)
        up = UploadPixels(self.loaded.image_res, 10**8)
        self.pixels = [up.pixels(up.decode(p.data)) for p in pictures]
        self.enc = self.loaded.tokenizer.encode([p.question for p in pictures])

    def _answer(self, start: int, n: int) -> None:
        import torch

        idx = [(start + j) % len(self.pixels) for j in range(n)]
        ids = torch.tensor(idx)
        self.answerer.answer([self.pixels[i] for i in idx], list(range(n)),
                             type(self.enc)(self.enc.input_ids[ids], self.enc.attention_mask[ids]))
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, concurrency: int, requests: int) -> dict[str, Any]:
        bs = min(concurrency, self.max_batch_size)
        self._answer(0, bs)  # warm-up
        times, sizes = [], []
        answered = failed = 0
        t0 = time.monotonic()
        # All the requests, and for at least CEILING_MIN_S: a one-second loop on a noisy box swung by 20 %.
        while answered + failed < requests or time.monotonic() - t0 < CEILING_MIN_S:
            t1 = time.monotonic()
            try:
                self._answer(answered + failed, bs)
            except Exception:  # counted, as a server counts a failed model call
                failed += bs
                continue
            times.append((time.monotonic() - t1) * 1000)
            sizes.append(bs)
            answered += bs
        wall = time.monotonic() - t0
        times.sort()
        return {"requests": answered + failed, "failures": failed, "answers_per_s": round(answered / wall, 2),
                "model_only": True, "p50_ms": None, "p95_ms": None, "p99_ms": None,
                "compute_p50_ms": percentile(times, 50) if times else None,
                "compute_p95_ms": percentile(times, 95) if times else None,
                "model_calls": len(sizes), "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
                "vision_images": answered, "cache_hits": None, "cache_misses": None, "dedups": None}


def add_setup_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags every scenario that starts systems shares (bench.lib.systems.Setup)."""
    ap.add_argument("--model", default=None, help="serving directory (default: the demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder", default="fast", choices=["reference", "fast"])
    ap.add_argument("--workers", type=int, default=2, help="the cluster's workers, and LitServe's")
    ap.add_argument("--max-batch-size", type=int, default=0, help="0: serve's default")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch threads of every model process (0: the cores divided by a system's model processes)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of every system")


def setup_from(args: argparse.Namespace, serve_flags: list[str] | None = None, log_dir: Path | None = None) -> Setup:
    setup = Setup(model=args.model, device=args.device, decoder=args.decoder, workers=args.workers,
                  max_batch_size=args.max_batch_size, torch_threads=args.torch_threads,
                  omp_wait_policy=args.omp_wait_policy, serve_flags=list(serve_flags or []))
    if log_dir is not None:
        setup.log_dir = log_dir
    return setup
