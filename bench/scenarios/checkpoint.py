"""Writes a ModelScope model directory the way ModelScope's hub ships mPLUG: its config files and a
`pytorch_model.bin` saved from ModelScope's own `MPlugForVisualQuestionAnswering` with distillation on (so the
momentum copies `*_m` and CLIP's text tower are in it), keys wrapped in `model` and prefixed `model.`.
Random weights; for exercising `vqa-async convert` at full size where the real download is impossible.

    python -m bench checkpoint --preset large DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from vqa_async.model.presets import PRESETS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["base", "large"], default="large")
    ap.add_argument("dst")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from modelscope.models.multi_modal.mplug.modeling_mplug import MPlugConfig, MPlugForVisualQuestionAnswering

    dst = Path(args.dst)
    PRESETS[args.preset].write_configs(dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["distill"] = True  # as trained upstream
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    config = MPlugConfig.from_yaml_file(str(dst / "config.yaml"))
    config.model_dir = str(dst)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = MPlugForVisualQuestionAnswering(config)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"built ModelScope's class: {n / 1e6:.0f} M values in its state dict, {time.time() - t0:.0f}s", flush=True)
    torch.save({"model": {f"model.{k}": v for k, v in model.state_dict().items()}}, dst / "pytorch_model.bin")
    print(f"wrote {dst / 'pytorch_model.bin'} ({(dst / 'pytorch_model.bin').stat().st_size / 2**30:.2f} GiB) "
          f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
