"""ModelScope's mPLUG VQA model, minus the parts that only training uses.

`ServingMPlugVQA` *is* ModelScope's `MPlugForVisualQuestionAnswering` (same modules, same key names, same
`forward`); it only leaves out what inference never touches:

- the distillation copies (`*_m`): `distill` is forced off;
- CLIP's text tower: only `visual_encoder.visual` is built;
- the vision projection `visual.proj`: VQA calls the ViT with `skip_last_layer=True`, which never applies it;
- the fusion layers below `FusionEncoder.start_layer`, which `FusionEncoder.forward` never runs: they become
  `nn.Identity` so the layers that do run keep their checkpoint names.

It also builds the ViT from the config's own width and patch size. ModelScope hard-codes a position-embedding
width of 768 (ViT-B-16) or 1024 (ViT-L-14); for those two the shapes are identical, and a narrower demo encoder
becomes possible.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import yaml
from modelscope.models.multi_modal.mplug import MPlugConfig
from modelscope.models.multi_modal.mplug.clip.clip import VisualTransformer
from modelscope.models.multi_modal.mplug.modeling_mplug import CONFIG_NAME, MPlugForVisualQuestionAnswering
from torch import nn

from vqa_async.model.files import WEIGHTS_NAME as WEIGHTS_NAME

BERT_CONFIG_NAME = "config_bert.json"
VOCAB_NAME = "vocab.txt"
CONFIGURATION_NAME = "configuration.json"

# The output projection of the answer decoder shares its weight with the decoder's word embeddings, as in BERT.
TIED_DECODER_WEIGHT = "text_decoder.cls.predictions.decoder.weight"
TIED_DECODER_SOURCE = "text_decoder.bert.embeddings.word_embeddings.weight"

# Checkpoint keys that serving never reads (see the module docstring). Fusion layers are matched separately,
# because which ones run depends on the config.
TRAINING_ONLY_PATTERNS = [
    re.compile(r"^[a-z_]+_m\."),  # visual_encoder_m., text_encoder_m., fusion_encoder_m., text_decoder_m.
    re.compile(r"^(visn_fc_m|visn_layer_norm_m)\."),
    re.compile(r"^visual_encoder\.(transformer|token_embedding|positional_embedding|ln_final|text_projection"
               r"|logit_scale)"),
    re.compile(r"^visual_encoder\.visual\.proj$"),
    re.compile(r"\.position_ids$"),  # derived buffers, rebuilt on load
]


class VisionTower(nn.Module):
    """Holds only CLIP's `.visual`, so that `model.visual_encoder.visual(...)` works as upstream."""

    def __init__(self, visual: VisualTransformer) -> None:
        super().__init__()
        self.visual = visual


class ServingMPlugVQA(MPlugForVisualQuestionAnswering):
    """`MPlugForVisualQuestionAnswering` for inference (and for training the demo model without distillation)."""

    def __init__(self, config: MPlugConfig) -> None:
        config.distill = False
        super().__init__(config)
        encoder = self.fusion_encoder.encoder
        for i in range(encoder.start_layer):
            encoder.layer[i] = nn.Identity()

    @staticmethod
    def _initialize_clip(config: Any, num_patches: int = 240) -> nn.Module:
        width = int(config.clip_vision_width)
        visual = VisualTransformer(
            input_resolution=int(config.image_res),
            patch_size=int(config.clip_vision_patch_size),
            width=width,
            layers=int(config.clip_vision_layers),
            heads=width // 64,  # CLIP's rule
            output_dim=int(config.clip_embed_dim),
        )
        # ModelScope wraps every block in torch.utils.checkpoint: only a cost at inference.
        visual.transformer.use_grad_ckp = False
        del visual.proj
        return VisionTower(visual)


def read_config(model_dir: str | os.PathLike[str]) -> MPlugConfig:
    """ModelScope's own config schema: `config.yaml` next to `config_bert.json` and `vocab.txt`.

    Read with `yaml.safe_load`, not ModelScope's `MPlugConfig.from_yaml_file`: that one uses the unsafe loader,
    so a `!!python/object/apply` tag in a model directory would run code in the server."""
    path = os.path.join(model_dir, CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not plain YAML (tags that build Python objects are refused): "
                             f"{str(e).splitlines()[0]}") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ValueError(f"{path} must be a mapping of setting names to values")
    config = MPlugConfig(**values)
    config.model_dir = str(model_dir)
    return config


def build_empty(config: MPlugConfig) -> ServingMPlugVQA:
    """The model with every parameter on the meta device: no memory, no random init."""
    with torch.device("meta"):
        model = ServingMPlugVQA(config)
    return model.eval()


def is_training_only(key: str, fusion_start_layer: int) -> bool:
    if any(p.search(key) for p in TRAINING_ONLY_PATTERNS):
        return True
    m = re.match(r"^fusion_encoder\.encoder\.layer\.(\d+)\.", key)
    return m is not None and int(m.group(1)) < fusion_start_layer


def serving_keys(model: nn.Module) -> set[str]:
    """The tensors a serving file holds: every parameter once. A tied parameter appears under its first name
    (the decoder's output weight under `TIED_DECODER_SOURCE`), which is what `named_parameters` yields."""
    return {k for k, _ in model.named_parameters()}
