"""Measures what N processes that load the same model directory cost together.

    python -m tools.memcheck --model DIR --processes 2

Each child loads the model, answers one question (so that every weight page is touched), reports its load time
and memory from /proc, and waits until all have reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from vqa_async.model.architecture import WEIGHTS_NAME
from vqa_async.model.memory import file_pss, smaps_rollup

MiB = 2**20


def child(model_dir: str | None, device: str) -> None:
    import torch

    from vqa_async.model.answer import Answerer
    from vqa_async.model.loader import load_model

    loaded = load_model(model_dir, device=device)
    answerer = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype)
    pixels = torch.zeros(3, loaded.image_res, loaded.image_res)
    answer = answerer.answer([pixels], [0], loaded.tokenizer.encode(["what color is the shape?"]))[0]
    weights = loaded.model_dir / WEIGHTS_NAME
    report = {"pid": __import__("os").getpid(), "load_s": round(loaded.load_seconds, 3), "answer": answer.text,
              "weights_file_bytes": weights.stat().st_size}
    print(json.dumps(report), flush=True)
    sys.stdin.readline()  # the parent measures us now, then lets us go
    del weights


def measure(model_dir: str | None, processes: int, device: str = "cpu") -> dict[str, Any]:
    from vqa_async.model.loader import DEMO_MODEL_DIR

    weights = Path(model_dir or DEMO_MODEL_DIR).resolve() / WEIGHTS_NAME
    cmd = [sys.executable, "-m", "tools.memcheck", "--child", "--device", device]
    if model_dir:
        cmd += ["--model", str(model_dir)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    rows = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a child exited with {p.wait()} before loading")
            rows.append(json.loads(line))
        for row in rows:  # every child is loaded and holding: the page cache is shared now
            roll = smaps_rollup(row["pid"])
            f = file_pss(weights, row["pid"])
            row.update(rss_mib=round(roll.get("Rss", 0) / MiB, 1), pss_mib=round(roll.get("Pss", 0) / MiB, 1),
                       weights_rss_mib=round(f["Rss"] / MiB, 1), weights_pss_mib=round(f["Pss"] / MiB, 1))
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.wait(timeout=60)
    size = weights.stat().st_size / MiB
    return {"model": str(weights.parent), "processes": processes, "weights_file_mib": round(size, 1),
            "weights_pss_sum_mib": round(sum(r["weights_pss_mib"] for r in rows), 1),
            "pss_sum_mib": round(sum(r["pss_mib"] for r in rows), 1), "workers": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.model, args.device)
    else:
        print(json.dumps(measure(args.model, args.processes, args.device)))


if __name__ == "__main__":
    main()
