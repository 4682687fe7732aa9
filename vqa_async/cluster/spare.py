"""A warm spare worker: imports what `vqa-async serve` needs, then waits for its settings on stdin.

    python -m vqa_async.cluster.spare        stdin: one JSON line, the worker's settings as VQA_* variables
                                             (config.settings_env); stdout: `ready` once its imports are done

The supervisor keeps one waiting (see children.SparePool). Nothing is loaded onto a device before the settings
arrive, so the spare can become a worker on any device; it then serves as `vqa-async serve` would with those
variables (vqa_async.app.serve). End of input (the supervisor retired it or died) ends it quietly.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    # What a worker imports before it can load a model: the interpreter start that a restart should not pay.
    import uvloop  # noqa: F401

    import vqa_async.model.loader  # noqa: F401  (torch, ModelScope's mPLUG, safetensors)
    from vqa_async.app import serve  # aiohttp, the handlers, the batcher
    from vqa_async.config import Settings
    from vqa_async.http.tracing import setup_logging
    from vqa_async.model.files import ModelLoadError

    # Tell the supervisor the imports are paid for, then hand stdout over to stderr: nobody reads the pipe after.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    env = {str(k): str(v) for k, v in json.loads(line).items()}
    os.environ.update(env)  # as a worker started cold has them: its environment is the same
    try:
        settings = Settings.from_env(env)
        setup_logging(settings.log_level)
        serve(settings)
    except (ModelLoadError, ValueError, OSError) as e:  # as `vqa-async serve` reports them
        print(f"vqa-async serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
