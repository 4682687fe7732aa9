"""The old import paths `vqa_async.tools.convert`, `.synth` and `.evaluate`, kept for code that used them.

One tools story: what the command line runs on model directories (`vqa-async convert | synth | eval`) is part of
the model layer and ships in the wheel (vqa_async/model/convert.py, synth.py, evaluate.py); `tools/` at the
repository's root holds the development scripts (training the demo model, measuring memory), which need the
source tree and the test dependencies and are not shipped. This package only points the old names at the new
modules (the same module objects, so that patching one patches the other).
"""

import sys

from vqa_async.model import convert, evaluate, synth

for _module in (convert, evaluate, synth):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

__all__ = ["convert", "evaluate", "synth"]
