"""deploy/: the Kubernetes manifests validate against a pinned Kubernetes version, the container file passes
hadolint, the HAProxy configuration the front's manifest asks for passes `haproxy -c` (rendered by the
project's own renderer), the systemd unit passes `systemd-analyze verify`, and the pieces agree with each other
(the front's DNS name is the workers' headless Service; the grace period covers the preStop and the drain)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vqa_async.cli import build_parser, cluster_options
from vqa_async.cluster import haproxy
from vqa_async.cluster.supervisor import Cluster
from vqa_async.config import settings_from_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.33.0"  # a release most managed clusters run; kubernetes-validate ships its schema


def tool(name: str) -> str:
    """A validator from requirements-test.txt, next to this Python (the venv's bin) or on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -r requirements-test.txt)")
    return found


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_manifests_validate_against_kubernetes() -> None:
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    done = subprocess.run([tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", *files],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout + done.stderr


def test_containerfile_passes_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), str(DEPLOY / "Containerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_front_manifest_renders_a_config_haproxy_accepts(tmp_path: Path) -> None:
    if haproxy.find_haproxy() is None:
        pytest.skip("needs Debian's haproxy")
    args = build_parser().parse_args(container(manifests()["Deployment", "vqa-front"])["args"])
    options = cluster_options(args)
    options.runtime_dir = tmp_path
    cfg = Cluster(options, settings_from_args(args, env={})).render()
    asyncio.run(haproxy.check_config(cfg))  # parses only: resolvers and the name are not queried
    text = cfg.read_text()
    assert "server-template dns 16 vqa-workers.vqa.svc.cluster.local:8000" in text
    assert "parse-resolv-conf" in text  # the pod's resolver: the cluster DNS
    assert "maxconn 128" in text


def test_the_pieces_agree() -> None:
    m = manifests()
    workers, front = m["Deployment", "vqa-workers"], m["Deployment", "vqa-front"]
    service = m["Service", "vqa-workers"]
    assert service["spec"]["clusterIP"] == "None"  # headless: the name lists the pods
    front_args = build_parser().parse_args(container(front)["args"])
    name, port = front_args.backend_dns.rsplit(":", 1)
    assert name == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == service["spec"]["ports"][0]["port"] == container(workers)["ports"][0]["containerPort"]
    assert front_args.workers == 0

    serve = container(workers)
    assert serve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in serve["volumeMounts"]
    serve_args = build_parser().parse_args(serve["args"])
    assert serve_args.command == "serve"
    # Kubernetes SIGKILLs after the grace period, counted from the start of preStop: it must cover the
    # preStop sleep (while the front drops the pod from DNS) and serve's own drain.
    pre_stop = int(serve["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + settings_from_args(serve_args, env={}).shutdown_timeout_s + 5
    assert workers["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert m["PodDisruptionBudget", "vqa-workers"]["spec"]["selector"] == workers["spec"]["selector"]


def test_systemd_unit_verifies_and_its_command_parses(tmp_path: Path) -> None:
    unit = (DEPLOY / "vqa-async.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start
    args = build_parser().parse_args(exec_start.group(2).split())
    stop = float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop >= settings_from_args(args, env={}).shutdown_timeout_s + 10  # the workers drain before SIGKILL
    assert "KillSignal=SIGTERM" in unit and "Restart=on-failure" in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: point it at this venv's console script
    here = tmp_path / "vqa-async.service"
    here.write_text(unit.replace(exec_start.group(1), tool("vqa-async")))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(here)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_autoscaler_scales_the_workers_on_a_metric_they_export(demo_dir: Path) -> None:
    from prometheus_client import generate_latest

    from vqa_async.app import init_app
    from vqa_async.config import Settings
    from vqa_async.http.app_keys import METRICS

    m = manifests()
    hpa, workers = m["HorizontalPodAutoscaler", "vqa-workers"], m["Deployment", "vqa-workers"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", workers["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == workers["metadata"]["namespace"]
    assert "replicas" not in workers["spec"]  # the autoscaler owns the count; apply would reset it
    assert hpa["spec"]["minReplicas"] >= 2  # one worker down (rollout, drain) must leave one answering
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    # The worker's own /metrics has that series, unlabelled (one value per pod).
    app = init_app(Settings(model=str(demo_dir), device="cpu"))
    page = generate_latest(app[METRICS].registry).decode()
    assert re.search(rf"^{name} 0\.0$", page, re.M), page
    # ...and Prometheus scrapes the port that serves it.
    annotations = workers["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container(workers)["ports"][0]["containerPort"]
