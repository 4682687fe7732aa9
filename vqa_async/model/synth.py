"""Random-weight replicas of mPLUG in the serving format, for speed and memory work where the real weights
cannot be downloaded. Same shapes, same code path; the answers mean nothing.

Tensors are generated one by one, seeded per tensor name, straight in the target dtype, and the model itself
is only ever built on the meta device: the one copy in memory is the dict that is written.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from vqa_async.model.architecture import build_empty, read_config, serving_keys
from vqa_async.model.presets import PRESETS
from vqa_async.model.weights import write_weights

NORM_WEIGHTS = ("LayerNorm.weight", "ln_pre.weight", "ln_post.weight", "ln_1.weight", "ln_2.weight",
                "visn_layer_norm.weight")


def synth(preset: str, dst: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0,
          progress: bool = True) -> int:
    """Writes the replica; returns its parameter count."""
    dst = Path(dst)
    PRESETS[preset].write_configs(dst)
    model = build_empty(read_config(dst))
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for k in tqdm(sorted(serving_keys(model)), desc=f"synth {preset}", disable=not progress, unit="tensor"):
        shape = params[k].shape
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
        if k.endswith(".bias"):
            t = torch.zeros(shape)
        elif k.endswith(NORM_WEIGHTS):
            t = torch.ones(shape)
        else:
            # BERT's and CLIP's init scale: small normal weights keep activations finite in fp16.
            t = torch.randn(shape, generator=gen) * 0.02
        tensors[k] = t.to(dtype)
        total += t.numel()
    write_weights(tensors, dst, {"producer": f"vqa-async synth {preset} seed={seed}"})
    return total
