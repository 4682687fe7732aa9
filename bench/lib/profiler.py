"""Where a process's CPU goes, sampled rather than guessed: py-spy on every Python process of a system.

`Spies(pids)` starts `py-spy record --nonblocking --threads --format raw` on each Python process (non-blocking:
the target is never paused; idle threads are not sampled), and `stop()` returns, per pid and thread, the number of
samples in each stage. py-spy counts a thread that is runnable but waiting for a core as active, so `split` does
not take the samples as CPU: it splits each thread's CPU, measured from /proc, by that thread's samples.
`classify` maps one stack to a stage by its deepest frame that a rule knows (the project's
own modules first, then the libraries under them), the same rules for our workers and for LitServe's processes.
A process that is not Python (HAProxy) is not sampled: all its CPU is the proxy's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

STAGES = ("proxy", "HTTP read+parse", "middlewares+metrics", "decode", "preprocess", "queue+collector", "model",
          "response", "event loop, other")

# (file path fragment, function names or None for any, stage): the first rule that a frame matches decides
# that frame; the deepest frame that any rule matches decides the stack.
RULES: list[tuple[str, frozenset[str] | None, str]] = [
    ("vqa_async/model/preprocess.py", frozenset({"decode", "decode_image", "to_rgb", "_decode_on_device",
                                                 "check_pixels"}), "decode"),
    ("vqa_async/model/preprocess.py", None, "preprocess"),
    ("vqa_async/core/service.py", frozenset({"_prepare", "_follow_up"}), "preprocess"),  # the sha256 is C: no frame
    ("bench/litserve_vqa.py", frozenset({"decode_request"}), "decode"),
    ("bench/litserve_vqa.py", frozenset({"predict", "batch", "unbatch"}), "model"),
    ("bench/litserve_vqa.py", frozenset({"encode_response"}), "response"),
    ("vqa_async/model/", None, "model"),
    ("vqa_async/core/adapter.py", None, "model"),
    ("vqa_async/batching/", None, "queue+collector"),
    ("vqa_async/core/", None, "queue+collector"),
    ("vqa_async/http/parse.py", None, "HTTP read+parse"),
    # uvloop runs the loop in C: a stack whose deepest frame is the server's run() is the loop's own work (epoll,
    # socket reads and writes, callbacks), not a middleware.
    ("vqa_async/http/server.py", frozenset({"run", "main"}), "event loop, other"),
    ("vqa_async/app.py", None, "event loop, other"),
    ("vqa_async/cli.py", None, "event loop, other"),
    ("vqa_async/http/handlers.py", frozenset({"metrics_middleware"}), "middlewares+metrics"),
    ("vqa_async/http/handlers.py", None, "response"),
    ("vqa_async/metrics.py", None, "middlewares+metrics"),
    ("vqa_async/http/", None, "middlewares+metrics"),  # accesslog, tracing, security, auth, quota, context
    ("prometheus_client/", None, "middlewares+metrics"),
    ("aiohttp/multipart.py", None, "HTTP read+parse"),
    ("aiohttp/streams.py", None, "HTTP read+parse"),
    ("aiohttp/http_parser.py", None, "HTTP read+parse"),
    ("aiohttp/web_request.py", None, "HTTP read+parse"),
    ("aiohttp/web_protocol.py", frozenset({"data_received"}), "HTTP read+parse"),
    ("aiohttp/web_response.py", None, "response"),
    ("aiohttp/http_writer.py", None, "response"),
    ("aiohttp/web_protocol.py", frozenset({"finish_response"}), "response"),
    ("aiohttp/", None, "middlewares+metrics"),  # routing, the middleware chain, the request handler's own work
    # LitServe's side: uvicorn + FastAPI + python-multipart in front, queues between its processes.
    ("python_multipart/", None, "HTTP read+parse"),
    ("multipart/", None, "HTTP read+parse"),
    ("starlette/formparsers.py", None, "HTTP read+parse"),
    ("starlette/requests.py", None, "HTTP read+parse"),
    # uvicorn's loop (uvloop too): a stack whose deepest frame is its server's run is the loop's own work, as ours.
    ("uvicorn/server.py", None, "event loop, other"),
    ("uvicorn/main.py", None, "event loop, other"),
    ("uvicorn/protocols/", frozenset({"data_received", "on_body", "on_url", "on_header", "on_headers_complete",
                                      "on_message_begin", "on_message_complete", "handle_events"}),
     "HTTP read+parse"),
    ("starlette/responses.py", None, "response"),
    ("fastapi/encoders.py", None, "response"),
    ("uvicorn/protocols/", frozenset({"send", "write"}), "response"),
    ("starlette/middleware", None, "middlewares+metrics"),
    ("litserve/", None, "queue+collector"),
    ("multiprocessing/", None, "queue+collector"),
    ("zmq/", None, "queue+collector"),
    ("fastapi/", None, "middlewares+metrics"),
    ("starlette/", None, "middlewares+metrics"),
    ("uvicorn/", None, "HTTP read+parse"),
]


def _frame(text: str) -> tuple[str, str]:
    """'func (path:line)' -> (func, path)."""
    func, _, rest = text.partition(" (")
    return func, rest.rsplit(":", 1)[0]


def classify(stack: str) -> str:
    """The stage of one py-spy stack (frames root first, separated by ';')."""
    for frame in reversed(stack.split(";")):
        func, path = _frame(frame)
        path = path.replace(os.sep, "/")
        for fragment, funcs, stage in RULES:
            if fragment in path and (funcs is None or func in funcs):
                return stage
    return "event loop, other"


def parse_raw(text: str) -> dict[int, Counter[str]]:
    """py-spy's raw output with --threads ('thread (TID)[: name];frame;... count' per line) -> samples per stage,
    per OS thread id (0 where a line names no thread)."""
    out: dict[int, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not (stack and count.isdigit()):
            continue
        tid = 0
        if stack.startswith("thread ("):
            head, _, stack = stack.partition(";")
            tid = int(head[len("thread ("):].split(")")[0], 0)
        out.setdefault(tid, Counter())[classify(stack)] += int(count)
    return out


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, from /proc/PID/task/TID/stat."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def split(cpu_s: dict[int, float], samples: dict[int, Counter[str]]) -> dict[str, float]:
    """Each thread's measured CPU seconds, split into stages in proportion to that thread's samples (py-spy counts
    a runnable thread as active, so samples alone over-weight threads that wait for a core on a busy box; the
    per-thread CPU does not). A thread with CPU and no samples: `event loop, other`."""
    out: Counter[str] = Counter()
    for tid, spent in cpu_s.items():
        got = samples.get(tid)
        n = sum(got.values()) if got else 0
        if got and n:
            for k, v in got.items():
                out[k] += spent * v / n
        elif spent > 0:
            out["event loop, other"] += spent
    return dict(out)


def is_python(pid: int) -> bool:
    try:
        return "python" in Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return False


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


class Spies:
    """py-spy on each Python process of `pids`, from construction to `stop()`."""

    def __init__(self, pids: list[int], rate: int = 100) -> None:
        exe = py_spy()
        if exe is None:
            raise SystemExit("py-spy is not installed: pip install py-spy (requirements-test.txt)")
        self.dir = Path(tempfile.mkdtemp(prefix="vqa-bench-pyspy-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        for pid in pids:
            if is_python(pid):
                self.procs[pid] = subprocess.Popen(
                    [exe, "record", "--nonblocking", "--threads", "--format", "raw", "--rate", str(rate),
                     "--pid", str(pid), "-o", str(self.dir / f"{pid}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, keep: Path | None = None) -> dict[int, dict[int, Counter[str]]]:
        """Stops every sampler (SIGINT: py-spy writes its file) and returns each pid's samples per stage, per
        thread; `keep`:
        a folder to copy py-spy's raw files into (PID.txt, for flamegraph.pl or a closer look)."""
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        out = {}
        for pid, p in self.procs.items():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            f = self.dir / f"{pid}.txt"
            out[pid] = parse_raw(f.read_text()) if f.exists() else {}
            if keep is not None and f.exists():
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, keep / f.name)
        shutil.rmtree(self.dir, ignore_errors=True)
        return out
