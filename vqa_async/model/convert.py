"""ModelScope model directory -> serving directory.

SRC is what `modelscope download --model damo/mplug_visual-question-answering_coco_large_en` fetches: ModelScope's
config files and `pytorch_model.bin` (keys possibly wrapped in `model`/`module` and prefixed `model.`). DST gets the
same config files and `model.safetensors` with only the tensors inference uses.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from modelscope.models.multi_modal.mplug.modeling_mplug import CONFIG_NAME
from tqdm import tqdm

from vqa_async.model.architecture import (
    BERT_CONFIG_NAME,
    CONFIGURATION_NAME,
    TIED_DECODER_SOURCE,
    TIED_DECODER_WEIGHT,
    VOCAB_NAME,
    build_empty,
    is_training_only,
    read_config,
    serving_keys,
)
from vqa_async.model.weights import write_weights

SOURCE_WEIGHTS = "pytorch_model.bin"
# Tied pairs: upstream's load_state_dict copies both keys into one Parameter, so the key that comes later in
# the model's state_dict order (the second here) wins. We keep that value, under the first name.
TIED = [(TIED_DECODER_SOURCE, TIED_DECODER_WEIGHT),
        ("text_decoder.cls.predictions.bias", "text_decoder.cls.predictions.decoder.bias")]


class ConvertError(Exception):
    pass


@dataclass
class Report:
    kept: int = 0
    kept_params: int = 0
    bytes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    tied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"kept {self.kept} tensors, {self.kept_params / 1e6:.1f} M parameters, {self.bytes / 2**20:.1f} MiB"]
        for prefix, n in sorted(self.dropped.items()):
            out.append(f"dropped {n:4d} training-only tensors under {prefix}")
        out += [f"tied: {t}" for t in self.tied]
        out += [f"ignored (no VQA module reads it): {k}" for k in self.ignored]
        return out


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConvertError(f"{path} cannot be read as a PyTorch state dict: {e}") from e
    for wrapper in ("model", "module"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
    if not isinstance(ckpt, dict):
        raise ConvertError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    # ModelScope strips "model." wherever it occurs; only a leading wrapper prefix is meant.
    return {re.sub(r"^(module\.|model\.)+", "", k): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, progress: bool = True) -> Report:
    src, dst = Path(src), Path(dst)
    for name in (CONFIG_NAME, BERT_CONFIG_NAME, VOCAB_NAME, SOURCE_WEIGHTS):
        if not (src / name).is_file():
            raise ConvertError(f"{src} lacks {name}: not a ModelScope mPLUG model directory")
    config = read_config(src)
    model = build_empty(config)
    params = dict(model.named_parameters())
    wanted = serving_keys(model)
    start = model.fusion_encoder.encoder.start_layer
    ckpt = read_checkpoint(src / SOURCE_WEIGHTS)

    report = Report()
    for first, second in TIED:
        if second in ckpt:
            if first in ckpt and not torch.equal(ckpt[first], ckpt[second]):
                report.tied.append(f"{second} differs from {first}; the model uses {second} for both, as upstream")
            else:
                report.tied.append(f"{second} = {first}, stored once")
            ckpt[first] = ckpt.pop(second)

    missing = sorted(wanted - ckpt.keys())
    if missing:
        raise ConvertError(f"{src / SOURCE_WEIGHTS} lacks {len(missing)} tensors the model needs, e.g. "
                           f"{', '.join(missing[:5])}: wrong model, or a config that does not match it")
    mismatched = [f"{k} {tuple(ckpt[k].shape)} vs {tuple(params[k].shape)}" for k in sorted(wanted)
                  if ckpt[k].shape != params[k].shape]
    if mismatched:
        raise ConvertError(f"shapes differ from the config for {len(mismatched)} tensors: {'; '.join(mismatched[:5])}")

    out: dict[str, torch.Tensor] = {}
    for k in tqdm(sorted(ckpt), desc="converting", disable=not progress, unit="tensor"):
        t = ckpt[k]
        if k in wanted:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[k] = t.contiguous()
            report.kept += 1
            report.kept_params += t.numel()
            report.bytes += t.numel() * t.element_size()
        elif is_training_only(k, start):
            report.dropped[".".join(k.split(".")[:2])] += 1
        else:
            report.ignored.append(k)

    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, BERT_CONFIG_NAME, VOCAB_NAME, CONFIGURATION_NAME):
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src / name, dst / name)
    write_weights(out, dst, {"producer": "vqa-async convert", "source": str(src)})
    return report
