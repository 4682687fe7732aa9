"""The CLI makes torch's OpenMP threads sleep when idle (bench/RESULTS.md, photos: spinning, two threads on 2 cores
took the CPU from the decoding threads and one `serve` answered photos 3.5x slower)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, sys; from vqa_async import cli; cli._quiet_openmp_threads(); import torch; "
         "print(os.environ.get('OMP_WAIT_POLICY'))")


def _policy(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_cli_sets_a_passive_wait_policy_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy(env) == "PASSIVE"


def test_the_environment_wins() -> None:
    assert _policy({**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
