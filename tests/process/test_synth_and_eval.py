"""The replica generator and the eval command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from vqa_async.model.architecture import WEIGHTS_NAME, build_empty, read_config, serving_keys
from vqa_async.model.synth import synth


def test_synth_writes_exact_shapes_seeded(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    synth("demo", a, dtype=torch.float16, seed=5, progress=False)
    synth("demo", b, dtype=torch.float16, seed=5, progress=False)
    model = build_empty(read_config(a))
    params = dict(model.named_parameters())
    with safe_open(str(a / WEIGHTS_NAME), "pt") as fa, safe_open(str(b / WEIGHTS_NAME), "pt") as fb:
        assert set(fa.keys()) == serving_keys(model)
        for k in fa.keys():
            t = fa.get_tensor(k)
            assert t.shape == params[k].shape and t.dtype == torch.float16
            assert torch.equal(t, fb.get_tensor(k))


def test_eval_prints_accuracy_json_last(demo_dir: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump.jsonl"
    out = subprocess.run([sys.executable, "-m", "vqa_async.cli", "eval", "--limit", "40", "--batch-size", "16",
                          "--dump", str(dump)], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 40 and result["accuracy"] >= 0.9
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"question", "answer", "label"}
    assert sum(r["answer"] == r["label"] for r in rows) / 40 == result["accuracy"]
