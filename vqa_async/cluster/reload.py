"""Rolling reloads: each worker in turn is drained through HAProxy's runtime API, restarted (onto a new model
directory if asked), and re-enabled once ready. The first worker to load a new model is its trial: if it never
becomes ready, it goes back to the model it had, the reload stops, and `cluster reload` is told why.

SIGUSR2 starts one; `vqa-async cluster reload` (control.py) leaves a request file with an id in the runtime
directory first, and finds its outcome in `reload-result-ID.json`. (SIGHUP is not a reload: the workers re-read
their keys and reopen their logs, supervisor.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vqa_async.cluster.runtime import read_json, write_json

if TYPE_CHECKING:
    from vqa_async.cluster.supervisor import Cluster, Worker

log = logging.getLogger(__name__)

ROLLBACK_GRACE_S = 5.0  # a worker that never got ready on the new model holds no requests worth waiting for


class ReloadFailed(RuntimeError):
    pass



async def rolling_reload(cl: Cluster, model: str | None = None) -> None:
    """Each worker in turn: drain, restart (onto `model`), wait ready, re-enable. Raises ReloadFailed if a
    worker never becomes ready: that worker goes back to its previous model and the reload stops."""
    async with cl._reloading:
        target = model or cl.good_model
        log.info("rolling reload of %d workers%s", len(cl.workers), f" onto {model}" if model else "")
        for w in cl.workers:
            if cl._stopping.is_set():
                raise ReloadFailed("the cluster is stopping")
            previous = w.model
            await cl.api.set_state(w.name, "drain")
            await _wait_idle(cl, w, timeout=cl.serve.timeout_s + 5)
            proc = await cl._restart(w, target, cl.serve.shutdown_timeout_s + 5, trial=True)
            try:
                await cl._wait_ready(w, proc, cl.opt.ready_timeout_s)
                w.on_trial = None
            except ReloadFailed as e:
                log.error("reload stopped: %s; worker %s goes back to %s", e, w.name, previous or "demo")
                proc = await cl._restart(w, previous, ROLLBACK_GRACE_S)
                with contextlib.suppress(ReloadFailed):
                    await cl._wait_ready(w, proc, cl.opt.ready_timeout_s)
                await cl.api.set_state(w.name, "ready")
                raise ReloadFailed(f"{e} on {target or 'the demo model'}; it is back on "
                                   f"{previous or 'the demo model'} and the reload stopped") from None
            cl.good_model = target  # ready on it: a worker that dies from now on restarts onto it
            cl.serve = cl.serve.replace(model=target)
            await cl.api.set_state(w.name, "ready")
            await _wait_up(cl, w, timeout=10)
            cl._write_state()
            log.info("worker %s reloaded", w.name)
        log.info("rolling reload done")


async def _wait_row(cl: Cluster, w: Worker, done: Callable[[dict[str, str]], bool], timeout: float) -> bool:
    """Polls HAProxy's stats row of `w` until `done(row)`; False if `timeout` passes first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if done((await cl.api.stats()).get(w.name, {})):
            return True
        await asyncio.sleep(0.1)
    return False


async def _wait_idle(cl: Cluster, w: Worker, timeout: float) -> None:
    if not await _wait_row(cl, w, lambda row: int(row.get("scur") or 0) == 0 and int(row.get("qcur") or 0) == 0,
                           timeout):
        log.warning("worker %s still busy after %.0fs of draining", w.name, timeout)


async def _wait_up(cl: Cluster, w: Worker, timeout: float) -> None:
    await _wait_row(cl, w, lambda row: row.get("status", "").startswith("UP"), timeout)


async def serve_requests(cl: Cluster) -> None:
    """SIGUSR2: serves each `cluster reload` request waiting in the runtime directory, or a plain reload."""
    requests = sorted(cl.runtime_dir.glob("reload-request-*.json"), key=lambda p: p.stat().st_mtime)
    if not requests:  # `kill -USR2`: nobody waits for the outcome but the log
        try:
            await rolling_reload(cl)
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
            await rolling_reload(cl, request.get("model"))
            result = {"id": request.get("id"), "ok": True, "model": cl.good_model}
        except ReloadFailed as e:
            result = {"id": request.get("id"), "ok": False, "reason": str(e), "model": cl.good_model}
        except Exception as e:  # a bug or HAProxy's runtime API failing: the log has the traceback
            log.exception("rolling reload failed")
            result = {"id": request.get("id"), "ok": False, "reason": str(e), "model": cl.good_model}
        if request.get("id"):
            write_json(cl.runtime_dir / f"reload-result-{request['id']}.json", result)
