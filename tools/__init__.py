"""Scripts for developing vqa-async, run from the repository's root (`python -m tools.train_demo`,
`python -m tools.memcheck`): they need the source tree and the test dependencies, and are not shipped in the
wheel. What the installed command runs on model directories (`vqa-async convert | synth | eval`) is in
vqa_async/model/ (vqa_async.tools is only its old import path)."""
