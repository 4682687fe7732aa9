"""A warm spare worker: imports what `vqa-async serve` needs, then waits for its command line on stdin.

    python -m vqa_async.cluster.spare        stdin: one JSON line, the `vqa-async` arguments to run
                                             stdout: `ready` once its imports are done

The supervisor keeps one waiting (see children.SparePool). Nothing is loaded onto a device before the command
line arrives, so the spare can become a worker on any device. End of input (the supervisor retired it or
died) ends it quietly.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    # What a worker imports before it can load a model: the interpreter start that a restart should not pay.
    import uvloop  # noqa: F401

    import vqa_async.app  # noqa: F401  (aiohttp, the handlers, the batcher)
    import vqa_async.model.loader  # noqa: F401  (torch, ModelScope's mPLUG, safetensors)
    from vqa_async import cli

    # Tell the supervisor the imports are paid for, then hand stdout over to stderr: nobody reads the pipe after.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    argv = [str(a) for a in json.loads(line)]
    sys.argv = ["vqa-async", *argv]  # as a cold-started worker would see it
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
