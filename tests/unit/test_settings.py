"""Settings as small typed groups behind the flat contract: the same VQA_* names and flags as always, "auto" resolved
into a new object, types from the annotations, `cluster`'s options from the same declarations, and no test
harness's variable in the production config."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vqa_async.cli import build_parser, cluster_options
from vqa_async.cluster.options import OPTION_GROUPS, ClusterOptions
from vqa_async.config import GROUPS, AskedSettings, BatchingSettings, Settings, settings_env
from vqa_async.config.fields import group_title

# The user's contract (a VQA_<NAME> variable and a --<name> flag each): as it stood before the groups, plus
# inline_prepare_kb (issue 26's ablation switch).
FLAT_NAMES = """model host port unix_socket device dtype max_batch_size max_wait_ms return_window_ms max_queue timeout_s
max_body_mb max_pixels max_questions max_question_chars allowed_media_domains allow_private_media
media_connect_timeout_s media_timeout_s max_form_parts body_timeout_s max_connections stuck_timeout_s
sick_after_failures decoder image_cache_entries image_cache_mb exact_preprocess gpu_decode preprocess_threads
max_preprocess_backlog torch_threads shutdown_timeout_s drain_s loop api_keys metrics_need_key trusted_proxies
scheduling preempt_share max_inflight_per_client tls_cert tls_key access_log worker_name log_level
inline_prepare_kb""".split()  # noqa: SIM905
ROOT = Path(__file__).resolve().parents[2]


def subparser(name: str) -> argparse.ArgumentParser:
    actions = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    return actions.choices[name]  # type: ignore[no-any-return]


def test_the_flat_names_variables_and_flags_are_the_contract_they_were() -> None:
    names = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(names) == sorted(FLAT_NAMES) and len(names) == len(set(names))
    assert sorted(f.name for g in GROUPS for f in dataclasses.fields(g)) == sorted(FLAT_NAMES)  # one group each
    env = settings_env(Settings(device="cpu"))
    assert sorted(env) == sorted("VQA_" + n.upper() for n in FLAT_NAMES)
    flags = {opt for a in subparser("serve")._actions for opt in a.option_strings}
    assert {"--" + n.replace("_", "-") for n in FLAT_NAMES if n != "log_level"} <= flags


def test_help_is_grouped_as_the_settings_are() -> None:
    titles = [g.title for g in subparser("serve")._action_groups]
    assert [group_title(g)[0] for g in GROUPS] == [t for t in titles if t not in ("positional arguments", "options")]
    cluster = [g.title for g in subparser("cluster")._action_groups]
    assert cluster[2:5] == [group_title(g)[0] for g in OPTION_GROUPS] and "Batching" in cluster
    batching = next(g for g in subparser("serve")._action_groups if g.title == "Batching")
    assert {a.dest for a in batching._group_actions} == {f.name for f in dataclasses.fields(BatchingSettings)}


def test_auto_is_resolved_into_a_new_object_and_never_left_in_one() -> None:
    asked = AskedSettings(device="cuda", max_batch_size=0, max_wait_ms=-1, log_level="debug")  # type: ignore[arg-type]
    assert (asked.max_batch_size, asked.max_wait_ms, asked.log_level) == (0, -1, "debug")  # left as asked
    cuda = Settings(device="cuda", log_level="debug")
    assert (cuda.max_batch_size, cuda.max_wait_ms, cuda.return_window_ms, cuda.log_level) == (64, 2.0, 2.0, "DEBUG")
    cpu = Settings(device="cpu", max_queue=40, preprocess_threads=2)
    assert (cpu.max_batch_size, cpu.max_wait_ms, cpu.max_preprocess_backlog) == (16, 5.0, 40)
    assert Settings().device in ("cpu", "cuda")
    assert cpu.replace(max_wait_ms=7.5).return_window_ms == 5.0  # resolved once: a replace keeps what was resolved
    for path in (ROOT / "vqa_async" / "config").glob("*.py"):
        assert "object.__setattr__" not in path.read_text(), path


@pytest.mark.parametrize("bad, named", [({"decoder": "slow"}, "decoder"), ({"loop": "trio"}, "loop"),
                                        ({"dtype": "int8"}, "dtype"), ({"port": "80"}, "port"),
                                        ({"max_batch_size": 1.5}, "max_batch_size"), ({"gpu_decode": 1}, "gpu_decode"),
                                        ({"drain_s": -1}, "drain_s"), ({"max_wait_ms": "3"}, "max_wait_ms"),
                                        ({"log_level": 3}, "log_level"), ({"log_level": "loud"}, "log_level")])
def test_a_value_of_the_wrong_type_or_outside_its_literal_is_named(bad: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=f"invalid setting {named}="):
        Settings(device="cpu", **bad)


def test_variables_are_read_by_the_fields_type() -> None:
    got = Settings.from_env({"VQA_DEVICE": "cpu", "VQA_MAX_BODY_MB": "2.5", "VQA_MAX_QUEUE": "9", "VQA_GPU_DECODE":
                             "yes", "VQA_API_KEYS": "", "VQA_DECODER": "reference"})
    assert (got.max_body_mb, got.max_queue, got.gpu_decode, got.api_keys, got.decoder) == (2.5, 9, True, None,
                                                                                           "reference")
    with pytest.raises(ValueError, match="VQA_MAX_QUEUE='9.5': expected a whole number"):
        Settings.from_env({"VQA_DEVICE": "cpu", "VQA_MAX_QUEUE": "9.5"})


def test_a_group_is_a_view_of_its_settings() -> None:
    s = Settings(device="cpu", max_batch_size=8, timeout_s=3)
    assert s.group(BatchingSettings) == BatchingSettings(max_batch_size=8, max_wait_ms=5.0, return_window_ms=5.0,
                                                         max_queue=256, timeout_s=3)
    assert isinstance(s, BatchingSettings)  # a function that needs one concern may take its group's type


def test_clusters_flags_are_its_options_declarations() -> None:
    assert cluster_options(build_parser().parse_args(["cluster"])) == ClusterOptions()  # same defaults, one source
    args = build_parser().parse_args(["cluster", "--retry-body-kb", "64", "--devices", "cpu,cpu", "--haproxy-log",
                                      "--backend", "10.0.0.2:8000", "--tls-cert", "c", "--tls-key", "k",
                                      "--max-wait-ms", "3"])
    assert (args.front_tls_cert, args.max_wait_ms, args.tls_cert if "tls_cert" in vars(args) else None) == (
        "c", 3.0, None)  # the front's TLS is not the workers'
    args.front_tls_cert = args.front_tls_key = None  # (no certificate files here for its check)
    options = cluster_options(args)
    assert (options.retry_body_bytes, options.devices, options.haproxy_log, options.backends) == (
        64 << 10, ["cpu", "cpu"], True, ["10.0.0.2:8000"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cluster", "--retry-body-kb", "8"])


def test_flags_a_option_group_declares_all_reach_the_options() -> None:
    declared = {f.name for g in OPTION_GROUPS for f in dataclasses.fields(g)}
    assert declared == {f.name for f in dataclasses.fields(ClusterOptions)}


def test_the_production_config_knows_no_test_variable(tmp_path: Path) -> None:
    # A fresh process, without the test suite's conftest: its variables are refused like any unknown VQA_*.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQA_")}
    code = "from vqa_async.config import OTHER_ENV, Settings; print(sorted(OTHER_ENV)); " \
           "Settings.from_env({'VQA_TEST_FAULT_FILE': 'x', 'VQA_DEVICE': 'cpu'})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "unknown environment variable VQA_TEST_FAULT_FILE" in done.stderr
    assert "VQA_TEST" not in done.stdout
    # The fault injector's process lets its own variable through.
    faults = str(ROOT / "vqa_async" / "testing" / "faults")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": faults, "VQA_TEST_FAULT_FILE": str(tmp_path / "f")})
    assert done.returncode == 0, done.stderr
