"""Test-only fault injection for cluster workers, never shipped: put this folder on PYTHONPATH and point
VQA_TEST_FAULT_FILE at a JSON file {"<worker port>": "fail" | "hang" | "slow:<seconds>"}.

The worker listening on that port (its `--port` in sys.argv, or its VQA_PORT: a cluster's workers get their
settings as VQA_* variables; read at each call, so that a warm spare told its port later is covered too) then has
every model call fail, hang forever, or take that long. The file is read
at each call, so a test can make a worker sick and well again while it runs. Each faulted call first appends
its port to `<VQA_TEST_FAULT_FILE>.calls`, so that a test can wait until a call is in progress.

A key "leak_bytes": N in the file (read once, at start): every upload the worker decodes keeps N bytes alive for
good, a memory leak of N bytes per upload that the memory test must catch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from types import ModuleType
from typing import Any

FAULT_FILE = os.environ.get("VQA_TEST_FAULT_FILE")

def _leak_bytes() -> int:
    try:
        with open(str(FAULT_FILE), encoding="utf-8") as f:
            return int(json.load(f).get("leak_bytes", 0))
    except (OSError, ValueError, AttributeError):
        return 0


LEAK_BYTES = _leak_bytes() if FAULT_FILE else 0
TARGET = "vqa_async.model.answer"
LEAK_TARGET = "vqa_async.model.preprocess"
_LEAKED: list[bytes] = []


def _port() -> str | None:
    argv = sys.argv
    return argv[argv.index("--port") + 1] if "--port" in argv[:-1] else os.environ.get("VQA_PORT")


def _fault() -> str | None:
    try:
        with open(str(FAULT_FILE), encoding="utf-8") as f:
            fault = json.load(f).get(_port())
            return fault if isinstance(fault, str) else None
    except (OSError, ValueError):
        return None


def _patch(module: ModuleType) -> None:
    cls = module.Answerer
    real = cls.answer_embedded

    def answer_embedded(self: Any, *args: Any, **kwargs: Any) -> Any:
        fault = _fault()
        if fault:
            with open(f"{FAULT_FILE}.calls", "a", encoding="utf-8") as f:
                f.write(f"{_port()}\n")
        if fault == "fail":
            raise RuntimeError("injected model failure (tests/faults/sitecustomize.py)")
        if fault == "hang":
            while True:
                time.sleep(3600)
        if fault and fault.startswith("slow:"):
            time.sleep(float(fault.split(":", 1)[1]))
        return real(self, *args, **kwargs)

    cls.answer_embedded = answer_embedded


def _leak(module: ModuleType) -> None:
    cls = module.UploadPixels
    real = cls.decode

    def decode(self: Any, data: bytes) -> Any:
        _LEAKED.append(b"\x01" * LEAK_BYTES)  # written, so resident (not calloc's untouched zero pages)
        return real(self, data)

    cls.decode = decode


PATCHES = {**({TARGET: _patch} if FAULT_FILE else {}), **({LEAK_TARGET: _leak} if LEAK_BYTES else {})}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        real_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            real_exec(module)
            PATCHES[name](module)

        loader.exec_module = exec_module
        return spec


if FAULT_FILE:
    from vqa_async.config import allow_env

    allow_env("VQA_TEST_FAULT_FILE")  # the harness's own variable, not a setting: vqa_async refuses unknown VQA_*

if PATCHES:
    sys.meta_path.insert(0, _PatchOnImport())
