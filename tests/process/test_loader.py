"""The loader: no random init, parameters backed by the file mapping, one clear error for a bad directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqa_async.model.architecture import TIED_DECODER_SOURCE, WEIGHTS_NAME, build_empty, read_config, serving_keys
from vqa_async.model.loader import LoadedModel, ModelLoadError, load_model
from vqa_async.model.memory import file_pss
from vqa_async.model.presets import LARGE


def test_parameters_are_views_of_the_file_mapping(demo: LoadedModel) -> None:
    weights = demo.model_dir / WEIGHTS_NAME
    total = sum(float(p.float().sum()) for p in demo.model.parameters())  # touch every page
    assert total == total  # not NaN
    mapped = file_pss(weights)
    # Every byte of the file is resident through the mapping: the parameters live there, not in copies.
    assert mapped["Rss"] >= weights.stat().st_size * 0.95


def test_loaded_weights_equal_the_file(demo: LoadedModel) -> None:
    on_disk = load_file(str(demo.model_dir / WEIGHTS_NAME))
    params = dict(demo.model.named_parameters())
    assert set(on_disk) == set(params)
    for k, t in on_disk.items():
        assert torch.equal(params[k], t), k


def test_decoder_output_is_tied_to_its_embeddings(demo: LoadedModel) -> None:
    head = demo.model.text_decoder.cls.predictions
    assert head.decoder.weight is demo.model.get_parameter(TIED_DECODER_SOURCE)
    assert head.decoder.bias is head.bias


def test_training_only_parts_are_not_built(demo: LoadedModel) -> None:
    m = demo.model
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.split(".")[0].endswith("_m") for n in names)
    assert not hasattr(m.visual_encoder, "transformer")  # CLIP's text tower
    assert not hasattr(m.visual_encoder.visual, "proj")
    assert m.distill is False


def test_large_replica_has_the_real_parameter_count(tmp_path: Path) -> None:
    LARGE.write_configs(tmp_path)
    model = build_empty(read_config(tmp_path))
    n = sum(p.numel() for p in model.parameters())
    assert 560e6 < n < 570e6  # ~566 M that inference uses
    visual = model.visual_encoder.visual
    assert visual.positional_embedding.shape == (1297, 1024)  # 36x36 patches of 14 px at 504 px, plus CLS
    assert model.text_decoder.cls.predictions.decoder.weight.shape == (30522, 768)
    assert len(serving_keys(model)) == len(list(model.parameters()))


def test_two_processes_share_one_copy_of_the_weights(demo_dir: Path) -> None:
    root = Path(__file__).resolve().parents[2]  # tools/ is the repository's, not the wheel's
    out = subprocess.run([sys.executable, "-m", "tools.memcheck", "--processes", "2"], cwd=root,
                         capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    size = report["weights_file_mib"]
    for w in report["workers"]:
        assert w["weights_rss_mib"] >= 0.95 * size  # each process has all of it mapped...
    assert report["weights_pss_sum_mib"] <= 1.2 * size  # ...and together they pay for one copy, not two


@pytest.mark.parametrize("damage", ["missing_dir", "missing_weights", "wrong_shape", "extra_key", "garbage"])
def test_bad_model_directory_is_one_clear_error(demo_dir: Path, tmp_path: Path, damage: str) -> None:
    d = tmp_path / "m"
    if damage != "missing_dir":
        shutil.copytree(demo_dir, d)
    w = d / WEIGHTS_NAME
    if damage == "missing_weights":
        w.unlink()
    elif damage in ("wrong_shape", "extra_key"):
        t = load_file(str(w))
        if damage == "wrong_shape":
            t[TIED_DECODER_SOURCE] = torch.zeros(3, 3)
        else:
            t["something.else"] = torch.zeros(1)
        save_file(t, str(w))
    elif damage == "garbage":
        w.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_cli_reports_a_bad_model_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vqa_async.cli", "eval", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "vqa-async eval: error: model directory" in out.stderr


def test_a_config_that_builds_python_objects_runs_nothing(demo_dir: Path, tmp_path: Path) -> None:
    """ModelScope reads config.yaml with the unsafe loader: a tag there ran a shell command in `eval` and `serve`."""
    d = tmp_path / "m"
    shutil.copytree(demo_dir, d)
    marker = tmp_path / "pwned"
    with (d / "config.yaml").open("a") as f:
        f.write(f'payload: !!python/object/apply:os.system ["touch {marker}"]\n')
    out = subprocess.run([sys.executable, "-m", "vqa_async.cli", "eval", "--model", str(d), "--limit", "1"],
                         capture_output=True, text=True, timeout=120)
    assert not marker.exists()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert str(d / "config.yaml") in out.stderr and "not plain YAML" in out.stderr


def test_config_yaml_must_be_a_mapping(demo_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(demo_dir, d)
    (d / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ModelLoadError, match="config.yaml must be a mapping"):
        load_model(d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loads_fp16_by_default(demo_dir: Path) -> None:
    loaded = load_model(demo_dir, device="cuda")
    assert loaded.dtype == torch.float16
    assert all(p.device.type == "cuda" and p.dtype == torch.float16 for p in loaded.model.parameters())
    bf = load_model(demo_dir, device="cuda", dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16
