"""A local worker: one `vqa-async serve` process at a time, and the one task that owns it.

    start() -> ready()          the first process, cold, until it answers /readyz (before supervise)
    supervise()                 the owner: restarts the process when it exits or fails liveness (with exponential
                                backoff if it keeps failing), and replaces it when asked (`restart`)
    restart(model, grace_s)     asks the owner for a new process (onto `model`); returns it once spawned
    wait_ready(proc, timeout)   until `proc` answers /readyz 200; WorkerNotReady if it exits, is replaced or is late

Every field is written by the worker's own methods, run by its owner (the supervisor's start, then `supervise`);
others ask through `restart` and read the properties. A reload trying a model on a worker hands it a Trial: until
the reload decides, a process that dies is not restarted onto the model on trial (the reload rolls it back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vqa_async.cluster.children import Launcher
from vqa_async.cluster.liveness import Liveness
from vqa_async.config import Settings

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker that lived this long starts its backoff afresh
SICK_GRACE_S = 5.0  # a worker restarted by liveness gets this long to exit on SIGTERM before SIGKILL
TRIAL_WAIT_S = 30.0  # how long a worker that died on a model under trial waits for the reload to roll it back

Process = asyncio.subprocess.Process


class WorkerNotReady(RuntimeError):
    """A worker's process exited, was replaced, or did not answer /readyz 200 in time."""


class Trial:
    """A reload trying a model on one worker: `previous` is where it goes back to. The reload accepts it once the
    worker is ready on the model, or restarts the worker onto `previous`."""

    def __init__(self, previous: str | None) -> None:
        self.previous = previous
        self.decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def accept(self) -> None:
        if not self.decided.done():
            self.decided.set_result(None)

    @property
    def open(self) -> bool:
        return not self.decided.done()


@dataclass
class Restart:
    """A request to a worker's owner: replace the process, onto `model`; `done` is set once it is spawned."""

    model: str | None
    grace_s: float
    done: asyncio.Future[Process]
    trial: Trial | None = None


@dataclass(frozen=True)
class Patience:
    ready_timeout_s: float  # a process not ready this long after its start is restarted
    unready_restart_s: float  # liveness: unready (or silent) this long after having been ready
    sick_grace_s: float = SICK_GRACE_S  # SIGTERM to SIGKILL for a process liveness gave up on


async def stop_process(proc: Process, grace_s: float, what: str) -> None:
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


@dataclass
class _State:
    """What the owner alone writes."""

    settings: Settings
    proc: Process | None = None
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0
    liveness: Liveness | None = None
    trial: Trial | None = None
    requests: asyncio.Queue[Restart] = field(default_factory=asyncio.Queue)


class Worker:
    def __init__(self, index: int, settings: Settings, launcher: Launcher, patience: Patience,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.index = index
        self._s = _State(settings)
        self._launcher = launcher
        self._patience = patience
        self._on_change = on_change  # the supervisor records every new process in state.json

    # -- what others read ---------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"w{self.index}"

    @property
    def settings(self) -> Settings:
        """What its next process serves with (a reload changes the model; a crash restart keeps it)."""
        return self._s.settings

    @property
    def port(self) -> int:
        return self._s.settings.port

    @property
    def device(self) -> str:
        return self._s.settings.device

    @property
    def model(self) -> str | None:
        return self._s.settings.model

    @property
    def proc(self) -> Process | None:
        return self._s.proc

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "device": self.device, "model": self.model,
                "pid": self._s.proc.pid if self._s.proc else None, "restarts": self._s.restarts}

    # -- what others ask --------------------------------------------------------------------------------------
    async def restart(self, model: str | None, grace_s: float, trial: Trial | None = None) -> Process:
        """Asks the owner to replace the process (onto `model`); returns the new process once it is spawned."""
        request = Restart(model, grace_s, asyncio.get_running_loop().create_future(), trial)
        self._s.requests.put_nowait(request)
        return await request.done

    async def wait_ready(self, proc: Process, timeout: float) -> None:
        """Until `proc` (this worker's process) answers /readyz 200; WorkerNotReady if it exits, is replaced, or the
        timeout passes first."""
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < end:
                if proc.returncode is not None:
                    raise WorkerNotReady(f"worker {self.name} exited with {proc.returncode} before it was ready "
                                   "(its error is in the cluster's log)")
                if self._s.proc is not proc:
                    raise WorkerNotReady(f"worker {self.name} was replaced before it was ready")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.2)
        raise WorkerNotReady(f"worker {self.name} not ready within {timeout:.0f} s")

    def hup(self) -> bool:
        """SIGHUP to the process (it re-reads its API keys and reopens its access log); False if none runs."""
        proc = self._s.proc
        if proc is None or proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)
            return True
        return False

    # -- the owner --------------------------------------------------------------------------------------------
    async def start(self) -> Process:
        """The first process, started cold (a spare is for replacing a worker, not for the cluster's start)."""
        return await self._spawn(warm=False)

    async def ready(self) -> None:
        """Until the first process is ready (WorkerNotReady says why not)."""
        assert self._s.proc is not None and self._s.liveness is not None
        await self.wait_ready(self._s.proc, self._patience.ready_timeout_s)
        self._s.liveness.saw_ready()

    async def supervise(self, stopping: asyncio.Event, session: aiohttp.ClientSession) -> None:
        s = self._s
        while not stopping.is_set():
            assert s.proc is not None and s.liveness is not None
            proc = s.proc
            trial = s.trial if s.trial and s.trial.open else None
            waits: dict[str, asyncio.Future[Any]] = {
                "exit": asyncio.ensure_future(proc.wait()),
                "request": asyncio.ensure_future(s.requests.get()),
                "stop": asyncio.ensure_future(stopping.wait()),
                "sick": asyncio.ensure_future(s.liveness.watch(session)),
                # shielded: the reload's future is not ours to cancel
                "decided": asyncio.ensure_future(asyncio.shield(trial.decided)) if trial else asyncio.Future(),
            }
            try:
                await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in waits.values():
                    t.cancel()
            if _result(waits["request"]) is not None:
                await self._serve(_result(waits["request"]))
                continue
            if stopping.is_set():
                return
            if _finished(waits["decided"]) and proc.returncode is None and not _finished(waits["sick"]):
                s.liveness.saw_ready()  # the reload saw it ready on the model: no longer on trial
                continue
            if (why := _result(waits["sick"])) is not None and proc.returncode is None:
                log.warning("worker %s (pid %d) restarted: %s", self.name, proc.pid, why)
                await stop_process(proc, self._patience.sick_grace_s, f"worker {self.name}")
            await self._after_exit(proc, stopping)

    async def _after_exit(self, proc: Process, stopping: asyncio.Event) -> None:
        s = self._s
        lived = time.monotonic() - s.started_at
        s.failures = 0 if lived > STABLE_AFTER_S else s.failures + 1
        delay = min(BACKOFF_MAX_S, 0.5 * 2 ** max(0, s.failures - 2)) if s.failures > 1 else 0.0
        trial = s.trial if s.trial and s.trial.open else None
        if trial:  # a reload is trying a model on it: the reload decides what comes next (a rollback)
            delay = TRIAL_WAIT_S
        log.warning("worker %s (pid %d) ended with %s after %.1f s; %s", self.name, proc.pid, proc.returncode, lived,
                    "the reload trying a model on it decides what next" if trial else f"restarting in {delay:.1f} s")
        request = await self._backoff(delay, stopping, trial)
        if stopping.is_set():
            return
        if request is not None:
            await self._serve(request)
            return
        if trial and trial.open:
            log.warning("worker %s: nobody decided after its trial; back to %s", self.name, trial.previous)
            s.settings = s.settings.replace(model=trial.previous)
            s.trial = None
        s.restarts += 1
        await self._spawn()  # HAProxy's health check puts it back in rotation once /readyz answers

    async def _backoff(self, delay: float, stopping: asyncio.Event, trial: Trial | None) -> Restart | None:
        """Waits `delay`, or less if the cluster stops, the reload decides, or a restart is asked (returned)."""
        if delay <= 0:
            return None
        get = asyncio.ensure_future(self._s.requests.get())
        others: list[asyncio.Future[Any]] = [asyncio.ensure_future(stopping.wait())]
        if trial:
            others.append(asyncio.ensure_future(asyncio.shield(trial.decided)))
        try:
            await asyncio.wait([get, *others], timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (get, *others):
                t.cancel()
        return _result(get)

    async def _serve(self, request: Restart) -> None:
        s = self._s
        try:
            if s.proc is not None:
                await stop_process(s.proc, request.grace_s, f"worker {self.name}")
            s.trial = request.trial
            s.settings = s.settings.replace(model=request.model)
            s.failures = 0
            proc = await self._spawn()
        except BaseException as e:
            if not request.done.done():
                request.done.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled"))
            raise
        if not request.done.done():
            request.done.set_result(proc)

    async def _spawn(self, warm: bool = True) -> Process:
        s = self._s
        proc, how = await self._launcher.start(s.settings, warm)
        s.proc, s.started_at = proc, time.monotonic()
        s.liveness = Liveness(self.port, proc.pid, self._patience.unready_restart_s, self._patience.ready_timeout_s,
                              s.started_at)
        log.info("worker %s started (%s): pid %d, port %d, %s, model %s", self.name, how, proc.pid, self.port,
                 self.device, self.model or "demo")
        self._on_change()
        return proc

    async def stop(self, grace_s: float) -> None:
        """At the cluster's end, once `supervise` returned: SIGTERM (SIGKILL after `grace_s`; at once if 0)."""
        proc = self._s.proc
        if proc is None or proc.returncode is not None:
            return
        if grace_s <= 0:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return
        await stop_process(proc, grace_s, f"worker {self.name}")


def _finished(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled()


def _result(task: asyncio.Future[Any]) -> Any:
    """What a finished task returned; None if it did not finish (or was cancelled)."""
    return task.result() if _finished(task) else None
