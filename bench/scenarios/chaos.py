"""The chaos bench: the cluster on the demo model under closed-loop load while workers are killed and stalled,
rolling reloads run, and reloads onto a broken model directory are attempted.

    python -m bench chaos --minutes M [--workers N] [--concurrency 50] [--seed S]

Events come one after another in random order (each round has one of each kind), a few seconds apart:
- kill: SIGKILL a random worker; timed until HAProxy has its replacement UP (restart_p50_s is their median);
- stall: SIGSTOP a random worker for 10 s, then SIGCONT (its requests wait; new ones go elsewhere);
- reload: `vqa-async cluster reload` (every worker restarted, one at a time), must exit 0;
- bad reload: `vqa-async cluster reload --model BROKEN` (a copy of the demo with corrupt weights), must exit 1.
The last stdout line is JSON: {requests, failures, kills, stalls, reloads, failed_reloads, restart_p50_s, p99_ms,
rss_growth_mb, ...}; rss_growth_mb is the cluster's total RSS (supervisor + HAProxy + workers) at the end minus
after warm-up. The load is the `distinct` workload (every upload new). The cluster's command is the launcher's
(bench.lib.systems.command); this scenario holds the process itself, to check its exit status. No process is
left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.lib.loadgen import Job, percentile
from bench.lib.systems import ROOT, Setup, launcher_flags
from bench.lib.workloads import Workload
from vqa_async.cluster.haproxy import RuntimeApi
from vqa_async.cluster.supervisor import free_port_pair, serve_command
from vqa_async.model.architecture import WEIGHTS_NAME
from vqa_async.model.loader import DEMO_MODEL_DIR
from vqa_async.testing.launch import start_cluster, stop_process

STALL_S = 10.0
WARMUP_S = 10.0


class Chaos:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.port = free_port_pair()
        self.rdir = workdir / "rt"
        self.broken = workdir / "broken-model"
        shutil.copytree(DEMO_MODEL_DIR, self.broken)
        (self.broken / WEIGHTS_NAME).write_bytes(b"\0" * 64)  # not safetensors: the worker fails to load it
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = RuntimeApi(self.rdir / "haproxy.sock")
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.restart_s: list[float] = []
        self.problems: list[str] = []
        self.in_flight = 0  # requests sent and not yet answered, now
        self.in_flight_at_faults: list[int] = []  # that count at the instant of each kill, stall and reload

    # -- the cluster ----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.rdir / "state.json").read_text()))

    def start(self) -> None:
        # The launcher's flags have the access log off: a line per request would bury the figures.
        setup = Setup(model=str(DEMO_MODEL_DIR), workers=self.args.workers)
        model, flags = launcher_flags("cluster", setup, [])
        self.proc = start_cluster(model, *flags, workers=setup.workers, port=self.port, runtime_dir=self.rdir,
                                  env=setup.env(), cwd=ROOT, ready=False).proc

    async def wait_all_up(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc and self.proc.poll() is None, "the cluster exited"
            try:
                rows = await self.api.stats()
                if rows and all(r["status"].startswith("UP") for r in rows.values()):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("the cluster did not come up")

    def rss_mb(self) -> float:
        state = self.state()
        pids = [state["pid"], state.get("haproxy_pid"), *(w["pid"] for w in state["workers"])]
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except (OSError, TypeError):
                pass
        return total / 1024

    # -- load -----------------------------------------------------------------------------------------------------
    async def load(self, jobs: Iterator[Job], stop: asyncio.Event) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/vqa"
        connector = aiohttp.TCPConnector(limit=self.args.concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:

            async def client(k: int) -> None:
                while not stop.is_set():
                    (form,) = next(jobs)
                    t0 = time.monotonic()
                    self.in_flight += 1
                    try:
                        async with s.post(url, data=form.body, headers={"Content-Type": form.content_type}) as r:
                            body = await r.read()
                            if r.status == 200:
                                self.latencies.append(time.monotonic() - t0)
                            else:
                                self.failures[f"{r.status} {body[:80].decode(errors='replace')}"] += 1
                    except (TimeoutError, aiohttp.ClientError) as e:
                        self.failures[type(e).__name__] += 1
                    finally:
                        self.in_flight -= 1

            await asyncio.gather(*(client(k) for k in range(self.args.concurrency)))

    # -- events ---------------------------------------------------------------------------------------------------
    async def kill(self) -> None:
        # As in steady state, the supervisor has a warm spare whose imports are done (a kill sooner than a spare's
        # imports after the last one, ~15 s on a busy 2-core box, costs a cold start; counted apart).
        end = time.monotonic() + 60
        while not self.state().get("spares_ready") and time.monotonic() < end:
            await asyncio.sleep(0.2)
        if not self.state().get("spares_ready"):
            self.counts["kills_without_ready_spare"] += 1
        workers = self.state()["workers"]
        w = self.rng.choice(workers)
        self.in_flight_at_faults.append(self.in_flight)
        os.kill(w["pid"], signal.SIGKILL)
        killed = time.monotonic()
        self.counts["kills"] += 1
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while time.monotonic() - killed < 120:
                now = next(x for x in self.state()["workers"] if x["name"] == w["name"])
                row = (await self.api.stats()).get(w["name"], {})
                # Back: a new process, answering /readyz itself, and UP in HAProxy.
                if now["pid"] != w["pid"] and row.get("status", "").startswith("UP"):
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(f"http://127.0.0.1:{w['port']}/readyz") as r:
                            if r.status == 200:
                                self.restart_s.append(time.monotonic() - killed)
                                return
                await asyncio.sleep(0.05)
        self.problems.append(f"worker {w['name']} not back within 120 s of SIGKILL")

    async def stall(self) -> None:
        w = self.rng.choice(self.state()["workers"])
        self.in_flight_at_faults.append(self.in_flight)
        os.kill(w["pid"], signal.SIGSTOP)
        self.counts["stalls"] += 1
        try:
            await asyncio.sleep(STALL_S)
        finally:
            os.kill(w["pid"], signal.SIGCONT)
        await self.wait_all_up(120)

    async def reload(self, model: Path | None = None) -> None:
        cmd = serve_command() + ["cluster", "reload", "--port", str(self.port), "--runtime-dir", str(self.rdir)]
        if model:
            cmd += ["--model", str(model)]
        self.in_flight_at_faults.append(self.in_flight)
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if model is None:
            self.counts["reloads"] += 1
            if proc.returncode != 0:
                self.problems.append(f"reload exited {proc.returncode}: {err.decode().strip()[-300:]}")
        else:
            self.counts["failed_reloads"] += 1
            if proc.returncode != 1:
                self.problems.append(f"reload onto a broken model exited {proc.returncode}: {out.decode()[-200:]}")
            models = {w["model"] for w in self.state()["workers"]}
            if models != {str(DEMO_MODEL_DIR)}:
                self.problems.append(f"after a failed reload the workers run {models}")
        await self.wait_all_up(120)

    async def events(self, until: float) -> None:
        """Rounds of every kind of event in a random order until `until`; the first round always runs whole, so
        that each kind happens at least once however short the run."""
        kinds = [self.kill, self.stall, self.reload, lambda: self.reload(self.broken)]
        first = True
        while True:
            self.rng.shuffle(kinds)
            for event in kinds:
                await asyncio.sleep(self.rng.uniform(1.0, 4.0))
                if time.monotonic() >= until and not first:
                    return
                await event()
            first = False

    async def run(self, jobs: Iterator[Job]) -> dict[str, Any]:
        self.start()
        await self.wait_all_up(600)
        stop = asyncio.Event()
        load = asyncio.create_task(self.load(jobs, stop))
        await asyncio.sleep(WARMUP_S)
        rss_start = self.rss_mb()
        start = time.monotonic()
        await self.events(start + self.args.minutes * 60)
        await asyncio.sleep(max(0.0, start + self.args.minutes * 60 - time.monotonic()))
        await self.wait_all_up(120)
        rss_end = self.rss_mb()
        stop.set()
        await load
        lat = sorted(x * 1000 for x in self.latencies) or [0.0]
        return {"requests": len(self.latencies) + sum(self.failures.values()),
                "failures": sum(self.failures.values()),
                "kills": self.counts["kills"], "stalls": self.counts["stalls"], "reloads": self.counts["reloads"],
                "failed_reloads": self.counts["failed_reloads"],
                "restart_p50_s": round(statistics.median(self.restart_s), 2) if self.restart_s else None,
                "p99_ms": percentile(lat, 99), "rss_growth_mb": round(rss_end - rss_start, 1),
                "restart_max_s": round(max(self.restart_s), 2) if self.restart_s else None,
                "p50_ms": percentile(lat, 50), "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
                "kills_without_ready_spare": self.counts["kills_without_ready_spare"],
                "in_flight_at_faults": self.in_flight_at_faults,
                "minutes": self.args.minutes, "workers": self.args.workers, "concurrency": self.args.concurrency,
                "failure_kinds": dict(self.failures.most_common(5)), "problems": self.problems}

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 120 s; nothing it started is left (the one launcher's stop)."""
        return None if self.proc is None else stop_process(self.proc, timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vqa-chaos-") as tmp:
        chaos = Chaos(args, Path(tmp))
        try:
            result = asyncio.run(chaos.run(Workload("distinct").endless()))
        finally:
            code = chaos.stop()
    result["cluster_exit"] = code
    print(json.dumps(result))
    return 0 if result["failures"] == 0 and not result["problems"] and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
