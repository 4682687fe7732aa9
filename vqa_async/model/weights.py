"""The serving weights file: `model.safetensors` with exactly the tensors inference uses, each once."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vqa_async.model.architecture import WEIGHTS_NAME, serving_keys


def write_weights(tensors: dict[str, torch.Tensor], dst: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Writes `dst/model.safetensors` atomically (a temporary file, then a rename), readable by all."""
    path = Path(dst) / WEIGHTS_NAME
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)
    path.chmod(0o644)  # safetensors writes 0600; workers may run as another user
    return path


def save_serving_weights(model: nn.Module, dst: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
    """Writes the model's serving tensors (tied ones once) to `dst/model.safetensors`, atomically."""
    keys = serving_keys(model)
    state = model.state_dict()
    tensors = {}
    for k in sorted(keys):
        t = state[k].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous().cpu()
    return write_weights(tensors, dst, {"producer": "vqa-async"})
