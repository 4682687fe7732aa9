"""Whether a running worker should be restarted: its /healthz and /readyz, polled once a second.

The worker's contract: /healthz 200 while the process can serve at all (503 once its model thread is stuck or
its batcher died); /readyz 200 while it belongs in rotation (503 while loading, draining, or while its model is
failing). HAProxy's health checks take a worker out of rotation within a second; this decides when to give up
on it and start a fresh process:

- /healthz answers non-200 twice in a row: the worker says it cannot recover;
- /healthz does not answer for `bound_s` (after it once did): hung, or starved of CPU for that long;
- /readyz is not 200 for `bound_s` after having been ready: sick;
- never ready within `ready_timeout_s` of its start.

A process stopped by a signal (SIGSTOP, a debugger) is left alone: somebody paused it on purpose, and HAProxy
keeps it out of rotation until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

POLL_S = 1.0
# Until it is first seen ready: a sick process may be ready for a moment only (HAProxy sends it traffic as soon as
# its check passes, and a few failed requests make it unready), and "unready after ready" must not miss that.
FIRST_READY_POLL_S = 0.2
PROBE_TIMEOUT_S = 2.0
HEALTHZ_FAILURES = 2


def is_stopped(pid: int) -> bool:
    """Stopped by a signal or traced (state T or t in /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] in ("T", "t")


async def probe(session: aiohttp.ClientSession, url: str) -> int | None:
    """The status `url` answers with, or None if it does not answer within PROBE_TIMEOUT_S."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as r:
            await r.read()
            return r.status
    return None


@dataclass
class Liveness:
    """The state of one worker process's checks; `verdict` says why to restart it, or None."""

    port: int
    pid: int
    bound_s: float
    ready_timeout_s: float
    started_at: float
    alive_seen: bool = False
    ready_seen: bool = False
    silent_since: float | None = None
    unready_since: float | None = None
    health_errors: int = 0

    def __post_init__(self) -> None:
        self.alive_seen = self.alive_seen or self.ready_seen

    def observe(self, healthz: int | None, readyz: int | None, now: float) -> str | None:
        if healthz == 200:
            self.alive_seen, self.silent_since, self.health_errors = True, None, 0
        elif healthz is not None:
            self.health_errors += 1
            if self.health_errors >= HEALTHZ_FAILURES:
                return f"/healthz answered {healthz} {self.health_errors} times in a row"
        elif self.alive_seen:
            self.silent_since = self.silent_since or now
            if now - self.silent_since >= self.bound_s:
                return f"/healthz did not answer for {now - self.silent_since:.0f} s"
        if readyz == 200:
            self.ready_seen, self.unready_since = True, None
        elif self.ready_seen and healthz is not None:
            self.unready_since = self.unready_since or now
            if now - self.unready_since >= self.bound_s:
                return f"not ready for {now - self.unready_since:.0f} s after having been ready"
        if not self.ready_seen and now - self.started_at >= self.ready_timeout_s:
            return f"not ready within {self.ready_timeout_s:.0f} s of its start"
        return None

    def saw_ready(self) -> None:
        """Somebody else saw the process ready (the start, a reload): it counts as having been ready."""
        self.alive_seen = self.ready_seen = True

    def paused(self) -> None:
        """The process is stopped: whatever it did not answer meanwhile does not count against it."""
        self.silent_since = self.unready_since = None
        self.health_errors = 0

    async def watch(self, session: aiohttp.ClientSession) -> str:
        """Polls until the worker should be restarted; returns why."""
        base = f"http://127.0.0.1:{self.port}"
        while True:
            await asyncio.sleep(POLL_S if self.ready_seen else FIRST_READY_POLL_S)
            if is_stopped(self.pid):
                self.paused()
                continue
            healthz = await probe(session, base + "/healthz")
            readyz = await probe(session, base + "/readyz") if healthz is not None else None
            if is_stopped(self.pid):  # stopped while we asked
                self.paused()
                continue
            verdict = self.observe(healthz, readyz, time.monotonic())
            if verdict:
                return verdict
