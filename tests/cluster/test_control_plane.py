"""The cluster's control plane carries no model stack, and settings have one way in.

`vqa-async cluster`, `cluster reload` and the Kubernetes front (`--workers 0 --backend-dns`) render a config and
watch children: none of them imports torch or ModelScope (checked in a fresh interpreter, and in the running
supervisor's memory map). Workers get their settings as one object (VQA_* variables) that reads back unchanged,
and an unknown VQA_* variable stops a server from starting, naming the setting it was probably meant to be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_support import start_cluster, stop_cluster

from vqa_async.cluster.haproxy import find_haproxy
from vqa_async.cluster.supervisor import free_port
from vqa_async.config import Settings, settings_env

# Run in a fresh interpreter: what the supervisor, `cluster reload` and the front import on their own.
CONTROL_PLANE = """
import sys
from pathlib import Path
from vqa_async import cli
from vqa_async.cluster.supervisor import Cluster
from vqa_async.config import settings_from_args

rdir = Path(sys.argv[1])
try:
    cli.main(["cluster", "reload", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
# No cluster on that port: the whole `cluster reload` path, up to its error.
assert cli.main(["cluster", "reload", "--port", sys.argv[2], "--runtime-dir", str(rdir / "none")]) == 2
# The Kubernetes front: its options, its settings (`--device auto` resolved too) and its HAProxy config.
args = cli.build_parser().parse_args(["cluster", "--workers", "0", "--backend-dns", "vqa-workers.example:8000",
                                      "--runtime-dir", str(rdir / "front")])
cfg = Cluster(cli.cluster_options(args), settings_from_args(args, env={})).render()
assert "server-template" in cfg.read_text()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "modelscope"))
print(" ".join(heavy) or "none")
"""


def test_the_control_plane_imports_neither_torch_nor_modelscope(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQA_")}
    done = subprocess.run([sys.executable, "-c", CONTROL_PLANE, str(tmp_path), str(free_port())],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "none"


@pytest.mark.skipif(find_haproxy() is None, reason="needs Debian's haproxy")
@pytest.mark.slow
def test_the_running_supervisor_maps_no_libtorch(tmp_path: Path, demo_dir: Path) -> None:
    cl = start_cluster(tmp_path, demo_dir, "--spares", "0", workers=1)
    try:
        supervisor = Path(f"/proc/{cl.proc.pid}/maps").read_text()
        worker = Path(f"/proc/{cl.worker_pids()[0]}/maps").read_text()
    finally:
        stop_cluster(cl)
    assert "libtorch" in worker  # what the check looks for is there to find
    assert "libtorch" not in supervisor


def test_settings_reach_a_worker_unchanged_as_one_object(demo_dir: Path) -> None:
    serve = Settings(model=str(demo_dir), device="cpu", max_question_chars=99, preprocess_threads=3, loop="asyncio",
                     log_level="DEBUG", max_wait_ms=7.5, exact_preprocess=True, api_keys=None, drain_s=0.25,
                     trusted_proxies="10.0.0.0/8", allowed_media_domains="example.com")
    env = settings_env(serve)
    assert env["VQA_EXACT_PREPROCESS"] == "true" and env["VQA_API_KEYS"] == ""
    assert Settings.from_env(env) == serve
    assert Settings.from_env(settings_env(Settings(device="cpu"))) == Settings(device="cpu")


@pytest.mark.parametrize("command", [["serve"], ["cluster", "--workers", "1"]])
def test_an_unknown_vqa_variable_stops_the_start(command: list[str], tmp_path: Path) -> None:
    # VQA_API_KEY for VQA_API_KEYS: silently ignored, it would start a server without authentication.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VQA_")}, "VQA_API_KEY": "x"}
    done = subprocess.run([sys.executable, "-m", "vqa_async.cli", *command, "--port", str(free_port()),
                           *(["--runtime-dir", str(tmp_path / "rt")] if command[0] == "cluster" else [])],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "VQA_API_KEY:" in done.stderr and "did you mean VQA_API_KEYS?" in done.stderr
    assert "serving on" not in done.stderr and "worker w0 started" not in done.stderr


def test_the_projects_own_variables_that_are_not_settings_are_allowed() -> None:
    Settings.from_env({"VQA_TEST_FAULT_FILE": "/tmp/f", "VQA_TEST_DEMO_DIR": "/tmp/d", "VQA_PHOTOS_DIR": "/tmp/p",
                       "VQA_DEVICE": "cpu"})
    with pytest.raises(ValueError, match="VQA_MAX_BATCH: did you mean VQA_MAX_BATCH_SIZE"):
        Settings.from_env({"VQA_MAX_BATCH": "8", "VQA_DEVICE": "cpu"})
