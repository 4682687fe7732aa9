"""How many intra-op threads the model gets when nobody says (bench/RESULTS.md, photos: on a 2-core box one
`serve` with torch's default of 2 threads answered photos at 0.8x LitServe, with 1 thread at 2x)."""

from __future__ import annotations

import os

import pytest
import torch

from vqa_async.batching.service import model_threads
from vqa_async.config import Settings


def test_on_cpu_the_model_leaves_half_the_cores_to_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert model_threads(Settings(device="cpu")) == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert model_threads(Settings(device="cpu")) == 1


def test_an_explicit_setting_wins() -> None:
    assert model_threads(Settings(device="cpu", torch_threads=3)) == 3


def test_on_a_gpu_torch_keeps_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_threads(Settings(device="cuda")) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_threads(Settings(device="auto")) == 0
