"""Rolling reloads: each worker in turn is drained through HAProxy's runtime API, restarted (onto a new model
directory if asked), and re-enabled once ready. The first worker to load a new model is its trial: if it never
becomes ready, it goes back to the model it had, the reload stops, and `cluster reload` is told why.

SIGUSR2 starts one; `vqa-async cluster reload` (control.py) leaves a request file with an id in the runtime
directory first, and finds its outcome in `reload-result-ID.json`. (SIGHUP is not a reload: the workers re-read
their keys and reopen their logs, supervisor.py.) The reload speaks to the workers only through their public
face (workers.py): `restart`, `wait_ready`, a Trial it decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqa_async.cluster.haproxy import RuntimeApi
from vqa_async.cluster.runtime import read_json, write_json
from vqa_async.cluster.workers import Trial, Worker, WorkerNotReady

log = logging.getLogger(__name__)

ROLLBACK_GRACE_S = 5.0  # a worker that never got ready on the new model holds no requests worth waiting for


class ReloadFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class ReloadTiming:
    drain_s: float  # how long a drained worker may take to finish what it holds
    stop_grace_s: float  # SIGTERM to SIGKILL for the old process
    ready_timeout_s: float  # how long the new process may take to get ready


class Reloader:
    """Owns the cluster's good model: the last one every worker was ready on, where failures go back to."""

    def __init__(self, workers: Sequence[Worker], api: RuntimeApi, runtime_dir: Path, timing: ReloadTiming,
                 model: str | None, stopping: asyncio.Event, on_change: Callable[[], None] = lambda: None) -> None:
        self.workers = workers
        self.api = api
        self.runtime_dir = runtime_dir
        self.timing = timing
        self._model = model
        self._stopping = stopping
        self._on_change = on_change  # the supervisor records the good model in state.json
        self._lock = asyncio.Lock()

    @property
    def model(self) -> str | None:
        return self._model

    async def rolling_reload(self, model: str | None = None) -> None:
        """Each worker in turn: drain, restart (onto `model`), wait ready, re-enable. Raises ReloadFailed if a
        worker never becomes ready: that worker goes back to its previous model and the reload stops."""
        async with self._lock:
            target = model or self._model
            log.info("rolling reload of %d workers%s", len(self.workers), f" onto {model}" if model else "")
            for w in self.workers:
                if self._stopping.is_set():
                    raise ReloadFailed("the cluster is stopping")
                await self._reload_one(w, target)
                self._model = target  # ready on it: a worker that dies from now on restarts onto it
                await self.api.set_state(w.name, "ready")
                await self._wait_row(w, lambda row: row.get("status", "").startswith("UP"), timeout=10)
                self._on_change()
                log.info("worker %s reloaded", w.name)
            log.info("rolling reload done")

    async def _reload_one(self, w: Worker, target: str | None) -> None:
        previous = w.model
        await self.api.set_state(w.name, "drain")
        if not await self._wait_row(w, lambda row: int(row.get("scur") or 0) == 0 and int(row.get("qcur") or 0) == 0,
                                    self.timing.drain_s):
            log.warning("worker %s still busy after %.0fs of draining", w.name, self.timing.drain_s)
        trial = Trial(previous)
        proc = await w.restart(target, self.timing.stop_grace_s, trial)
        try:
            await w.wait_ready(proc, self.timing.ready_timeout_s)
            trial.accept()
        except WorkerNotReady as e:
            log.error("reload stopped: %s; worker %s goes back to %s", e, w.name, previous or "demo")
            proc = await w.restart(previous, ROLLBACK_GRACE_S)
            with contextlib.suppress(WorkerNotReady):
                await w.wait_ready(proc, self.timing.ready_timeout_s)
            await self.api.set_state(w.name, "ready")
            raise ReloadFailed(f"{e} on {target or 'the demo model'}; it is back on "
                               f"{previous or 'the demo model'} and the reload stopped") from None

    async def _wait_row(self, w: Worker, done: Callable[[dict[str, str]], bool], timeout: float) -> bool:
        """Polls HAProxy's stats row of `w` until `done(row)`; False if `timeout` passes first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if done((await self.api.stats()).get(w.name, {})):
                return True
            await asyncio.sleep(0.1)
        return False

    async def serve_requests(self) -> None:
        """SIGUSR2: serves each `cluster reload` request waiting in the runtime directory, or a plain reload."""
        requests = sorted(self.runtime_dir.glob("reload-request-*.json"), key=lambda p: p.stat().st_mtime)
        if not requests:  # `kill -USR2`: nobody waits for the outcome but the log
            try:
                await self.rolling_reload()
            except ReloadFailed:
                pass  # logged where it failed
            except Exception:
                log.exception("rolling reload failed")
            return
        for path in requests:
            request: dict[str, Any] = {}
            try:
                request = read_json(path)
                path.unlink()
                await self.rolling_reload(request.get("model"))
                result = {"id": request.get("id"), "ok": True, "model": self._model}
            except ReloadFailed as e:
                result = {"id": request.get("id"), "ok": False, "reason": str(e), "model": self._model}
            except Exception as e:  # a bug or HAProxy's runtime API failing: the log has the traceback
                log.exception("rolling reload failed")
                result = {"id": request.get("id"), "ok": False, "reason": str(e), "model": self._model}
            if request.get("id"):
                write_json(self.runtime_dir / f"reload-result-{request['id']}.json", result)
