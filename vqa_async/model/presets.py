"""Model shapes: the demo model trained on easy-VQA, and random-weight replicas of mPLUG for speed work.

Each preset is the pair of ModelScope config files (`config.yaml`, `config_bert.json`) plus how to write a
vocabulary. `large` has exactly the tensor shapes of damo/mplug_visual-question-answering_coco_large_en.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from modelscope.models.multi_modal.mplug.modeling_mplug import CONFIG_NAME

from vqa_async.model.architecture import BERT_CONFIG_NAME, CONFIGURATION_NAME, VOCAB_NAME

# BERT's special tokens at BERT's positions: ModelScope's beam search hard-codes [CLS]=101 as the start token
# and [SEP]=102 as the end token.
_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}

EASY_VQA_WORDS = [
    "a", "black", "blue", "brown", "circle", "color", "contain", "does", "gray", "green", "image", "in", "is",
    "no", "not", "of", "present", "rectangle", "red", "shape", "teal", "the", "there", "triangle", "what",
    "yellow", "yes",
]


def bert_like_vocab(size: int, words: list[str]) -> list[str]:
    """A WordPiece vocabulary of `size` entries with BERT's special tokens in place, the given words, and every
    letter and digit as a word and as a `##` piece, so that any English question tokenizes without [UNK]."""
    vocab = [_SPECIAL.get(i, f"[unused{i}]") for i in range(104)]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + chars + [f"##{c}" for c in chars] + words
    seen = set(vocab)
    for p in pieces:
        if p not in seen:
            vocab.append(p)
            seen.add(p)
    if len(vocab) > size:
        raise ValueError(f"vocabulary needs {len(vocab)} entries, more than {size}")
    vocab += [f"[filler{i}]" for i in range(len(vocab), size)]
    return vocab


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    bert: dict[str, Any]
    vocab_size: int
    words: list[str] = field(default_factory=list)

    def write_configs(self, dst: str | os.PathLike[str]) -> None:
        """Everything but the weights: config.yaml, config_bert.json, vocab.txt, configuration.json."""
        d = Path(dst)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(yaml.safe_dump(self.config, sort_keys=False))
        bert = dict(self.bert, vocab_size=self.vocab_size)
        (d / BERT_CONFIG_NAME).write_text(json.dumps(bert, indent=2) + "\n")
        (d / VOCAB_NAME).write_text("\n".join(bert_like_vocab(self.vocab_size, self.words)) + "\n")
        (d / CONFIGURATION_NAME).write_text(json.dumps(MODELSCOPE_CONFIGURATION, indent=2) + "\n")


# What ModelScope's hub ships as configuration.json for the VQA model: enough for its `pipeline()` to pick
# MPlugForAllTasks and MPlugPreprocessor.
MODELSCOPE_CONFIGURATION: dict[str, Any] = {
    "framework": "pytorch",
    "task": "visual-question-answering",
    "model": {"type": "mplug"},
    "pipeline": {"type": "visual-question-answering"},
    "preprocessor": {"type": "mplug-tasks-preprocessor"},
}

_BERT_BASE: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "encoder_width": 768,
    "add_cross_attention": False,
    "use_cache": False,
    "gradient_checkpointing": False,
    "text_encoder_layers": 6,
    "fusion_layers": 6,
    "text_decode_layers": 12,
    "stride_layer": 6,
}

_VQA_BASE: dict[str, Any] = {
    "task": "visual-question-answering",
    "bert_config": BERT_CONFIG_NAME,
    "distill": False,
    "min_length": 1,
    "max_length": 10,
    "beam_size": 5,
    "text_encoder": "bert-base-uncased",
    "text_decoder": "bert-base-uncased",
}

LARGE = Preset(
    name="large",
    config=dict(_VQA_BASE, image_res=504, vision_width=1024, clip_name="ViT-L-14", clip_embed_dim=768,
                clip_image_resolution=224, clip_vision_layers=24, clip_vision_width=1024,
                clip_vision_patch_size=14),
    bert=_BERT_BASE,
    vocab_size=30522,
    words=EASY_VQA_WORDS,
)

BASE = Preset(
    name="base",
    config=dict(_VQA_BASE, image_res=224, vision_width=768, clip_name="ViT-B-16", clip_embed_dim=512,
                clip_image_resolution=224, clip_vision_layers=12, clip_vision_width=768,
                clip_vision_patch_size=16),
    bert=_BERT_BASE,
    vocab_size=30522,
    words=EASY_VQA_WORDS,
)

# The demo model: the same architecture at easy-VQA's scale (64x64 images, 13 answers, 26 question words).
DEMO = Preset(
    name="demo",
    config=dict(_VQA_BASE, image_res=64, vision_width=128, clip_name="ViT-B-16", clip_embed_dim=128,
                clip_image_resolution=64, clip_vision_layers=4, clip_vision_width=128,
                clip_vision_patch_size=16),
    bert=dict(_BERT_BASE, hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=64, encoder_width=128, text_encoder_layers=2, fusion_layers=2,
              text_decode_layers=2),
    vocab_size=256,
    words=EASY_VQA_WORDS,
)

# The demo's widths with mPLUG-large's input size: 504 px images, so that preprocessing a photo costs what it
# costs for the real model, while the model stays cheap enough for a CPU bench of the upload path
# (`bench sweep --images photos`): 28 px patches (325 image tokens; large has 1,297), 2 ViT layers, answers of at
# most 5 tokens. On a GPU the real model costs little per answer, so a cheap model is the GPU's ratio of upload
# work to model work, not a flattering one (bench/RESULTS.md, "Figures moved out of the code").
PHOTO504 = Preset(
    name="photo504",
    config=dict(DEMO.config, image_res=504, clip_image_resolution=504, clip_vision_layers=2,
                clip_vision_patch_size=28, max_length=5),
    bert=DEMO.bert,
    vocab_size=1024,
    words=EASY_VQA_WORDS + ["picture", "person", "how", "many", "are", "it", "cat", "cup", "rocket", "woman"],
)

PRESETS = {p.name: p for p in (DEMO, BASE, LARGE, PHOTO504)}
