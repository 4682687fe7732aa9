"""The converter, on checkpoints written by ModelScope's own class."""

from __future__ import annotations

from pathlib import Path

import addict
import pytest
import torch
import yaml
from modelscope.models.multi_modal.mplug.modeling_mplug import MPlugConfig, MPlugForVisualQuestionAnswering
from safetensors import safe_open

from vqa_async.model.answer import Answerer
from vqa_async.model.architecture import WEIGHTS_NAME
from vqa_async.model.convert import ConvertError, convert
from vqa_async.model.loader import load_model


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MPlugForVisualQuestionAnswering]:
    """A ModelScope directory whose checkpoint is what training leaves: distill on (momentum copies `*_m`),
    CLIP's text tower, keys wrapped in `model` and prefixed `model.`."""
    from vqa_async.testing.pipeline_support import make_reference_model_dir

    d = make_reference_model_dir(tmp_path_factory.mktemp("upstream"), seed=3)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["distill"] = True
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    config = MPlugConfig.from_yaml_file(str(d / "config.yaml"))
    config.model_dir = str(d)
    torch.manual_seed(3)
    model = MPlugForVisualQuestionAnswering(config).eval()
    with torch.no_grad():  # make answers non-trivial, as the reference dir does
        model.text_decoder.cls.predictions.bias.normal_(0, 2.0)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state}, d / "pytorch_model.bin")
    return d, model


def test_convert_keeps_what_inference_uses_and_answers_the_same(upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, model = upstream
    report = convert(src, tmp_path, progress=False)
    assert any("visual_encoder_m" in k for k in report.dropped)
    assert any(k.startswith("visual_encoder.transformer") for k in report.dropped)
    assert any("decoder.weight" in t for t in report.tied)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert not any("_m." in k or k.startswith("visual_encoder.transformer") or k.endswith("visual.proj")
                   for k in keys)
    assert "text_decoder.cls.predictions.decoder.weight" not in keys  # tied: stored once

    loaded = load_model(tmp_path)
    ours = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype)
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(3, loaded.image_res, loaded.image_res, generator=g) for _ in range(3)]
    qs = ["what is it?", "is there a cat?", "how many dogs are in the picture?"]
    got = ours.answer(pixels, [0, 1, 2], loaded.tokenizer.encode(qs))
    enc = loaded.tokenizer.encode(qs)
    with torch.inference_mode():
        topk, _ = model(torch.stack(pixels), addict.Dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask),
                        train=False)
    assert [a.token_ids for a in got] == [[int(t) for t in ids[0]] for ids in topk]


def test_convert_to_float16(upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, _ = upstream
    convert(src, tmp_path, dtype=torch.float16, progress=False)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def with_checkpoint(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    """A copy of the ModelScope directory `src` whose pytorch_model.bin holds `state`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_missing_keys_are_refused(upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, model = upstream
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    bad = with_checkpoint(src, tmp_path / "src", state)
    with pytest.raises(ConvertError, match="lacks .* tensors the model needs"):
        convert(bad, tmp_path / "dst", progress=False)


def test_mismatched_shapes_are_refused(upstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src, model = upstream
    state = dict(model.state_dict())
    state["visual_encoder.visual.ln_pre.weight"] = torch.ones(7)
    bad = with_checkpoint(src, tmp_path / "src", state)
    with pytest.raises(ConvertError, match="shapes differ"):
        convert(bad, tmp_path / "dst", progress=False)


def test_not_a_modelscope_directory(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="not a ModelScope mPLUG model directory"):
        convert(tmp_path, tmp_path / "dst", progress=False)
