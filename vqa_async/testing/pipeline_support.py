"""ModelScope's own, unmodified VQA pipeline on a tiny random-weight mPLUG, as the reference for parity tests.

`make_reference_model_dir` writes a model directory that `modelscope.pipelines.pipeline(
Tasks.visual_question_answering, model=DIR)` loads as it would damo/mplug_visual-question-answering_coco_large_en,
only small: a 1-layer ViT-B-16 (upstream hard-codes its 768-wide position embedding, so the width stays 768) and a
64-wide BERT. `reference_pipeline` builds that pipeline, `reference_answer` asks it one question.

ModelScope's pipeline module imports its OFA model and preprocessors too, and those import `fairseq` and
`torchaudio` at module level, and its multi-modal preprocessors import `decord`. fairseq and torchaudio do not
install here, decord's wheel breaks `pip check`, and the mPLUG path never calls any of them, so
`install_stand_ins` puts minimal stand-in modules in `sys.modules` first. The remaining test-only packages that
the import chain needs are in requirements-test.txt.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import yaml

# ModelScope file names (modelscope.utils.constant.ModelFile and modeling_mplug.CONFIG_NAME), spelled out so
# that writing a directory does not import ModelScope.
CONFIG_NAME = "config.yaml"
BERT_CONFIG_NAME = "config_bert.json"
VOCAB_NAME = "vocab.txt"
CONFIGURATION_NAME = "configuration.json"
WEIGHTS_NAME = "pytorch_model.bin"

# What ModelScope's hub ships as configuration.json for damo/mplug_visual-question-answering_coco_large_en:
# `pipeline()` reads `pipeline.type` to pick VisualQuestionAnsweringPipeline, `model.type` + `task` to build
# MPlugForAllTasks, and `preprocessor.type` is MPlugPreprocessor's registry name.
REFERENCE_CONFIGURATION: dict[str, Any] = {
    "framework": "pytorch",
    "task": "visual-question-answering",
    "model": {"type": "mplug"},
    "pipeline": {"type": "visual-question-answering"},
    "preprocessor": {"type": "mplug-tasks-preprocessor"},
}

IMAGE_RES = 32

# MPlugConfig's schema (config.yaml). ViT-B-16 means patch 16 and, upstream, a 768-wide position embedding
# (modeling_mplug.MPlug._initialize_clip), so clip_vision_width and vision_width must be 768. CLIP's text tower
# is built but never run; it is kept tiny.
REFERENCE_CONFIG: dict[str, Any] = {
    "task": "visual-question-answering",
    "bert_config": BERT_CONFIG_NAME,
    "image_res": IMAGE_RES,
    "batch_size_train": 4,
    "vision_width": 768,
    "distill": False,
    "clip_name": "ViT-B-16",
    "batch_size_test": 4,
    "k_test": 4,
    "alpha": 0.4,
    "warm_up": True,
    "eos": "[SEP]",
    "optimizer": None,
    "schedular": None,
    "min_length": 1,
    "max_length": 10,
    "beam_size": 5,
    "add_ocr": False,
    "add_object": False,
    "text_encoder": "bert-base-uncased",
    "text_decoder": "bert-base-uncased",
    "clip_embed_dim": 64,
    "clip_image_resolution": IMAGE_RES,
    "clip_vision_layers": 1,
    "clip_vision_width": 768,
    "clip_vision_patch_size": 16,
    "clip_context_length": 8,
    "clip_vocab_size": 64,
    "clip_transformer_width": 64,
    "clip_transformer_heads": 2,
    "clip_transformer_layers": 1,
    "queue_size": 64,
    "embed_dim": 64,
    "temp": 0.07,
}

# config_bert.json; vocab_size is filled in from the vocabulary.
REFERENCE_BERT: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "encoder_width": 64,
    "add_cross_attention": False,
    "use_cache": False,
    "gradient_checkpointing": False,
    "text_encoder_layers": 2,
    "fusion_layers": 2,
    "text_decode_layers": 2,
    "stride_layer": 6,
}

# fmt: off
_WORDS = [
    "a", "an", "and", "are", "at", "black", "blue", "box", "brown", "car", "cat", "circle", "color", "colour",
    "dog", "does", "for", "gray", "green", "how", "image", "in", "is", "it", "left", "many", "man", "no", "not",
    "of", "on", "orange", "picture", "pink", "purple", "red", "right", "shape", "sky", "square", "table", "teal",
    "the", "there", "this", "to", "tree", "triangle", "what", "where", "which", "white", "who", "yellow", "yes",
]
# fmt: on


def reference_vocab() -> list[str]:
    """BERT's layout: [PAD] at 0, [unusedN] up to 99, then [UNK] [CLS] [SEP] [MASK] at 100-103 (the beam search
    hard-codes 101 as start and 102 as end), then punctuation, letters and digits as words and as `##` pieces, and
    some English words, so that any English question tokenizes without [UNK]."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    pieces = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + chars + [f"##{c}" for c in chars] + _WORDS
    seen = set(vocab)
    for p in pieces:
        if p not in seen:
            vocab.append(p)
            seen.add(p)
    return vocab


def _unavailable(qualname: str) -> Any:
    """A stand-in for a class or function: importable, usable in annotations and as a base class, and raising
    NotImplementedError if anything calls it."""
    module, _, name = qualname.rpartition(".")

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{qualname} is a test stand-in; the mPLUG path never calls it")

    return type(name, (), {"__init__": __init__, "__module__": module, "__qualname__": name})


def _identity(obj: Any) -> Any:
    return obj


# Module -> the names ModelScope imports from it at module level on the way to the VQA pipeline (the mPLUG path
# calls none).
# Found by importing modelscope.pipelines.multi_modal.visual_question_answering_pipeline; see
# modelscope/preprocessors/ofa/{asr,base}.py and modelscope/models/multi_modal/ofa/{modeling_mmspeech,vit}.py
# and generate/multihead_attention.py.
_STAND_INS: dict[str, list[str]] = {
    "fairseq": [],
    "fairseq.data": [],
    "fairseq.data.audio": [],
    "fairseq.data.audio.feature_transforms": ["CompositeAudioFeatureTransform"],
    "fairseq.data.audio.speech_to_text_dataset": ["S2TDataConfig"],
    "fairseq.data.data_utils": ["compute_mask_indices"],
    "fairseq.incremental_decoding_utils": ["with_incremental_state"],
    "fairseq.models": [],
    "fairseq.models.wav2vec": [],
    "fairseq.models.wav2vec.wav2vec2": ["TransformerSentenceEncoderLayer"],
    "fairseq.modules": ["LayerNorm", "SamePad", "TransposeLast"],
    "fairseq.modules.fairseq_dropout": ["FairseqDropout"],
    "fairseq.modules.quant_noise": ["quant_noise"],
    "fairseq.modules.transformer_sentence_encoder": ["init_bert_params"],
    "fairseq.utils": ["index_put", "softmax", "log_softmax"],
    "torchaudio": [],
    "torchaudio.compliance": [],
    "torchaudio.compliance.kaldi": [],
    "torchaudio.sox_effects": [],
    # Installable (decord==0.6.0) but abandoned, and its wheel's inner tag (cp36) makes `pip check` fail.
    # modelscope.preprocessors.multi_modal imports it for its video preprocessors, and ModelScope's lazy importer
    # first checks `importlib.util.find_spec("decord")`.
    "decord": ["VideoReader", "cpu"],
}

# Applied as a class decorator at import time, so it must work: the identity.
_DECORATORS = {"fairseq.incremental_decoding_utils.with_incremental_state"}


def install_stand_ins() -> None:
    """Put stand-in `fairseq`, `torchaudio` and `decord` modules into `sys.modules`, unless a real one is importable.

    ModelScope's VQA pipeline module imports its OFA modules and multi-modal preprocessors, which import these at
    module level; fairseq and torchaudio cannot be installed here, and the mPLUG path never calls any of them.
    Every stand-in callable raises NotImplementedError.
    Each module gets a real ModuleSpec, so `importlib.util.find_spec` works, while `importlib.metadata` still
    finds no distribution, so transformers reports torchaudio as unavailable. Idempotent."""
    for root in ("fairseq", "torchaudio", "decord"):
        if root in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(root) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            continue
        for name, attrs in _STAND_INS.items():
            if name != root and not name.startswith(root + "."):
                continue
            module = types.ModuleType(name, "Test stand-in: the mPLUG path never calls it.")
            module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
            module.__path__ = []
            module.__file__ = None
            for attr in attrs:
                qualname = f"{name}.{attr}"
                setattr(module, attr, _identity if qualname in _DECORATORS else _unavailable(qualname))
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
        # `from fairseq import utils` reads the attribute, set above; nothing else needed.


def make_reference_model_dir(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random-weight mPLUG VQA model directory that the unmodified ModelScope pipeline loads.

    The weights are `MPlugForVisualQuestionAnswering(config)` built under `torch.manual_seed(seed)`, with the text
    side redrawn (see `_liven`) so that the beam search gives answers that depend on the image and the question,
    often several tokens long, instead of [SEP] or one fixed token chain. Deterministic for a given seed.
    Returns the absolute path."""
    import torch

    d = Path(path).resolve()
    d.mkdir(parents=True, exist_ok=True)
    vocab = reference_vocab()
    (d / CONFIG_NAME).write_text(yaml.safe_dump(REFERENCE_CONFIG, sort_keys=False))
    bert = dict(REFERENCE_BERT, vocab_size=len(vocab))
    (d / BERT_CONFIG_NAME).write_text(json.dumps(bert, indent=2) + "\n")
    (d / VOCAB_NAME).write_text("\n".join(vocab) + "\n")
    (d / CONFIGURATION_NAME).write_text(json.dumps(REFERENCE_CONFIGURATION, indent=2) + "\n")

    install_stand_ins()
    from modelscope.models.multi_modal.mplug import MPlugConfig
    from modelscope.models.multi_modal.mplug.modeling_mplug import MPlugForVisualQuestionAnswering

    config = MPlugConfig.from_yaml_file(str(d / CONFIG_NAME))
    config.model_dir = str(d)
    torch.manual_seed(seed)
    model = MPlugForVisualQuestionAnswering(config)
    _liven(model, vocab, torch.Generator().manual_seed(seed + 1))
    torch.save(model.state_dict(), d / WEIGHTS_NAME)
    return d


def _liven(model: Any, vocab: list[str], gen: Any) -> None:
    """Redraw the text side so that a random model gives varied, word-like answers of varying length.

    BERT's own initialisation (std 0.02) leaves every layer's contribution tiny next to the decoder's token
    embedding, so the beam search is a fixed token chain whatever the image or question. Redrawn here: the
    linear layers of the text encoder, fusion encoder and decoder at 1.5/sqrt(fan_in), their embeddings at std 1,
    the visual position embedding (upstream starts it at zeros) at std 0.5, and the decoder's output bias: small
    noise, [SEP] at +2.5 so answers end at various lengths, whole words +1, `##` pieces -1, punctuation -2, and
    the other bracketed specials and [unusedN] at -10."""
    import math

    import torch

    with torch.no_grad():
        pos = model.visual_encoder.visual.positional_embedding
        pos.copy_(torch.randn(pos.shape, generator=gen) * 0.5)
        done: set[int] = set()  # the decoder's output matrix is tied to its word embeddings
        for part in (model.text_encoder, model.fusion_encoder, model.text_decoder):
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    std = 1.5 / math.sqrt(module.in_features)
                elif isinstance(module, torch.nn.Embedding):
                    std = 1.0
                else:
                    continue
                if id(module.weight) not in done:
                    done.add(id(module.weight))
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
        bias = model.text_decoder.cls.predictions.bias
        bias.copy_(torch.randn(bias.shape, generator=gen) * 0.3)
        for i, token in enumerate(vocab):
            if token == "[SEP]":
                bias[i] = 2.5
            elif len(token) > 1 and token.startswith("[") and token.endswith("]"):
                bias[i] = -10.0
            elif token.startswith("##"):
                bias[i] -= 1.0
            elif len(token) == 1 and not token.isalnum():
                bias[i] -= 2.0
            elif len(token) > 1:
                bias[i] += 1.0


def reference_pipeline(model_dir: str | os.PathLike[str]) -> Any:
    """ModelScope's own VQA pipeline on `model_dir`, on the CPU. The path is made absolute: ModelScope asks its
    hub about any relative `owner/name`-shaped path."""
    install_stand_ins()
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    return pipeline(Tasks.visual_question_answering, model=str(Path(model_dir).resolve()), device="cpu")


def reference_answer(pipe: Any, image: Any, question: str) -> str:
    """The pipeline's answer to `question` about the PIL `image`."""
    from modelscope.outputs import OutputKeys

    return str(pipe({"image": image, "text": question})[OutputKeys.TEXT])
