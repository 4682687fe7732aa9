"""Remote workers in the HAProxy configuration: named `--backend`s and `--backend-dns` discovery render a config
HAProxy accepts, and bad flags are clean errors. (The real traffic through them: tests/test_fleet.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vqa_async.cli import main
from vqa_async.cluster import haproxy
from vqa_async.cluster.backends import parse_backend_dns
from vqa_async.cluster.supervisor import Cluster, ClusterOptions, free_port
from vqa_async.config import Settings


def render(tmp_path: Path, demo_dir: Path, **options: object) -> str:
    cluster = Cluster(ClusterOptions(port=free_port(), runtime_dir=tmp_path, **options),  # type: ignore[arg-type]
                      Settings(model=str(demo_dir), device="cpu"))
    cfg = cluster.render()
    if haproxy.find_haproxy():
        asyncio.run(haproxy.check_config(cfg))
    return cfg.read_text()


def test_no_workers_here_only_named_hosts(tmp_path: Path, demo_dir: Path) -> None:
    text = render(tmp_path, demo_dir, workers=0, backends=["10.77.0.11:8000", "[fd00::12]:8000"])
    assert "server w0" not in text
    assert "server remote0 10.77.0.11:8000 check on-marked-down shutdown-sessions" in text
    assert "server remote1 [fd00::12]:8000 check" in text  # an IP: checking a name would ask DNS
    assert "resolvers" not in text


@pytest.mark.parametrize("resolver", [None, "127.0.0.1:5353"])
def test_dns_discovery_renders_a_server_template_and_resolvers(tmp_path: Path, demo_dir: Path,
                                                                resolver: str | None) -> None:
    dns = parse_backend_dns("vqa-workers.vqa.svc.cluster.local:8000", resolver, slots=8)
    text = render(tmp_path, demo_dir, workers=1, backend_dns=dns)
    assert "server w0 127.0.0.1:" in text  # local workers and discovered ones side by side
    assert ("server-template dns 8 vqa-workers.vqa.svc.cluster.local:8000 check resolvers workers_dns "
            "init-addr none") in text
    assert "resolvers workers_dns" in text
    assert (f"nameserver ns1 {resolver}" if resolver else "parse-resolv-conf") in text


@pytest.mark.parametrize("argv, message", [
    (["cluster", "--workers", "0"], "--workers 0 needs workers elsewhere"),
    (["cluster", "--backend-dns", "no-port"], "expected NAME:PORT"),
    (["cluster", "--backend-dns", "name:99999"], "port must be a number"),
    (["cluster", "--backend-dns", "name:8000", "--resolver", "dns.example:53"], "expected IP:PORT"),
    (["cluster", "--resolver", "127.0.0.1:53"], "--resolver only applies to --backend-dns"),
    (["cluster", "--backend", "10.0.0.1"], "expected HOST:PORT"),
])
def test_bad_remote_flags_are_clean_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
