"""Loads a serving directory: the model built on the meta device, its tensors assigned from a safetensors mmap.

On CPU in the file's dtype, every parameter stays a view of the file mapping: nothing is copied, and processes
that load the same file share one copy of it in the page cache. Any dtype or device change copies, once, tensor
by tensor, straight from the mapping.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from modelscope.models.multi_modal.mplug import MPlugConfig
from modelscope.models.multi_modal.mplug.modeling_mplug import CONFIG_NAME
from safetensors import safe_open

from vqa_async.model.architecture import (
    BERT_CONFIG_NAME,
    TIED_DECODER_SOURCE,
    VOCAB_NAME,
    WEIGHTS_NAME,
    ServingMPlugVQA,
    build_empty,
    read_config,
    serving_keys,
)
from vqa_async.model.files import ModelLoadError as ModelLoadError
from vqa_async.model.memory import memory_report
from vqa_async.model.preprocess import QuestionTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo"


@dataclass
class LoadedModel:
    model: ServingMPlugVQA
    config: MPlugConfig
    tokenizer: QuestionTokenizer
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    load_seconds: float

    @property
    def name(self) -> str:
        return self.model_dir.name

    @property
    def image_res(self) -> int:
        return int(self.config.image_res)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))} or auto") from None


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    missing = [n for n in (CONFIG_NAME, BERT_CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME) if not (model_dir / n).is_file()]
    if missing:
        hint = " (a ModelScope download? convert it first: vqa-async convert SRC DST)" \
            if (model_dir / "pytorch_model.bin").exists() else ""
        raise ModelLoadError(f"model directory {model_dir} lacks {', '.join(missing)}{hint}")


def load_model(model_dir: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None) -> LoadedModel:
    """`dtype` None: FP16 on CUDA, the file's own dtype on CPU (so that nothing is copied)."""
    t0 = time.perf_counter()
    path = Path(model_dir) if model_dir is not None else DEMO_MODEL_DIR
    path = path.resolve()
    check_model_dir(path)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} asked for, but CUDA is not available here")
    want = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    try:
        config = read_config(path)
        model = build_empty(config)
        tokenizer = QuestionTokenizer(str(path))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"model directory {path}: cannot read its config: {e}") from e

    expected = serving_keys(model)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            if missing or unexpected:
                raise ModelLoadError(
                    f"{path / WEIGHTS_NAME} does not match the config: {len(missing)} missing "
                    f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
                    f"({', '.join(unexpected[:3])}{'…' if len(unexpected) > 3 else ''})")
            for k in sorted(keys):
                t = f.get_tensor(k)
                if t.shape != params[k].shape:
                    raise ModelLoadError(f"{path / WEIGHTS_NAME}: {k} has shape {tuple(t.shape)}, the config "
                                         f"says {tuple(params[k].shape)}")
                state[k] = t
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ModelLoadError(f"{path / WEIGHTS_NAME} cannot be read: {e}") from e

    file_dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    target = want or (torch.float16 if dev.type == "cuda" else file_dtype)
    copies = 0
    for k, t in state.items():
        if t.is_floating_point() and (t.dtype != target or dev.type != "cpu"):
            state[k] = t.to(device=dev, dtype=target)
            copies += 1
        elif dev.type != "cpu":
            state[k] = t.to(device=dev)
            copies += 1
    model.load_state_dict(state, strict=False, assign=True)
    _restore_derived(model, dev)
    model.eval().requires_grad_(False)  # inference only: no autograd bookkeeping on the weights
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise ModelLoadError(f"{path}: tensors left without weights: {', '.join(meta[:5])}")
    seconds = time.perf_counter() - t0
    where = "mapped from the file, no copy" if copies == 0 else f"{copies} tensors copied to {dev} {target}"
    log.info("loaded %s on %s as %s in %.2fs (%s); %s", path, dev, str(target).removeprefix("torch."), seconds,
             where, memory_report(dev))
    return LoadedModel(model, config, tokenizer, path, dev, target, seconds)


def _restore_derived(model: ServingMPlugVQA, device: torch.device) -> None:
    """Re-tie the decoder's output weight to its word embeddings (assign=True replaced the Parameter objects),
    and rebuild the `position_ids` buffers that the file does not carry."""
    head = model.text_decoder.cls.predictions
    head.decoder.weight = model.get_submodule(TIED_DECODER_SOURCE.rsplit(".", 1)[0]).weight
    head.decoder.bias = head.bias
    for module in model.modules():
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            module.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand((1, -1)))
