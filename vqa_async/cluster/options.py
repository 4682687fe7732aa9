"""`vqa-async cluster`'s own options, declared as `serve`'s settings are (vqa_async/config/fields.py): one field
each with its default and help, from which the flags, their argument groups and docs/settings.md are made.

The workers' settings are `serve`'s (vqa_async/config/), given to `cluster` as flags too; the options here are
what only the cluster has: how many workers, HAProxy's front, the supervisor's patience. They have flags, not
VQA_* variables.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vqa_async.cluster.backends import DNS_SLOTS, DnsBackends, parse_backend, parse_backend_dns
from vqa_async.cluster.control import RELOAD_WAIT_S
from vqa_async.config.fields import add_flags, dest, group_title, setting, setting_list

# Uploads up to this size are held whole by HAProxy and so survive a dying worker (see the template). The buffer
# costs HAProxy CPU in proportion to its size on every request (bench/RESULTS.md, "Figures moved out of the
# code"). `cluster --retry-body-kb` sets it.
RETRYABLE_BODY_BYTES = 1 << 20
# Settings that are not passed on to the workers: the front's address is HAProxy's, and TLS ends there.
FRONT_ONLY = ("host", "port", "unix_socket", "log_level", "tls_cert", "tls_key")


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


@dataclass
class WorkerOptions:
    """Cluster workers: how many, where, and the spares that replace them."""

    workers: int = setting(2, "serve processes on this machine (0: only remote ones)")
    devices: list[str] = setting_list("spread workers over these, round robin, e.g. cuda:0,cuda:1", metavar="LIST")
    backends: list[str] = setting_list("HOST:PORT of a `vqa-async serve` elsewhere (repeatable)", flag="--backend",
                                       action="append")
    backend_dns: DnsBackends | None = setting(
        None, "a DNS name whose A records are `vqa-async serve` hosts (e.g. a Kubernetes headless Service); HAProxy "
              "re-resolves it every second and adds or removes workers without a reload", metavar="NAME:PORT")
    spares: int = setting(1, "warm pre-imported processes kept waiting to replace a dead worker in seconds (0: none)",
                          parse=_at_least(0))


@dataclass
class FrontOptions:
    """Cluster front: HAProxy, the single entry point, and its per-client limits."""

    host: str = setting("127.0.0.1", "address HAProxy listens on")
    port: int = setting(8080, "HAProxy's port: the single entry point")
    stats_port: int = setting(0, "HAProxy stats page and /metrics (0: port+1)")
    queue_timeout_s: float = setting(5.0, "HAProxy queue wait before a 503")
    server_maxconn: int = setting(0, "requests in flight per worker (0: twice the workers' max batch size)")
    haproxy_log: bool = setting(False, "HAProxy's request log on stderr: one JSON line per request, the access log's "
                                       "keys", action="store_true")
    retry_body_bytes: int = setting(
        RETRYABLE_BODY_BYTES, "uploads up to this size (KB) are retried on another worker if theirs dies (HAProxy "
                              "buffers them; a bigger buffer costs HAProxy more CPU per request)",
        flag="--retry-body-kb", parse=_at_least(16), shown=str(RETRYABLE_BODY_BYTES // 1024))
    max_conn_per_source: int = setting(256, "connections one client address may hold open; more get 429 (0: no "
                                            "limit)", parse=_at_least(0))
    rate_limit_per_source: float = setting(0.0, "requests per second one client address may send, averaged over "
                                                "10 s; more get 429 (0: no limit)")
    # The front's TLS and per-client rate: HAProxy's, so not passed on to the workers (hence their own dests).
    rate_limit: float = setting(0.0, "requests per second one client may send, averaged over 10 s; the client is its "
                                     "API key (Authorization or X-API-Key) or else its address; more get 429 (0: no "
                                     "limit)", metavar="R")
    tls_cert: str | None = setting(None, "HAProxy serves HTTPS (HTTP/2 and 1.1) with this certificate (chain); needs "
                                         "--tls-key", dest="front_tls_cert", metavar="PEM")
    tls_key: str | None = setting(None, "the key of --tls-cert", dest="front_tls_key", metavar="PEM")


@dataclass
class SupervisorOptions:
    """Cluster supervisor: where its files live, and its patience with workers."""

    runtime_dir: Path | None = setting(None, "where haproxy.cfg, its socket and state.json live (default "
                                             "/tmp/vqa-async-cluster-PORT; created 0700, refused if another user owns "
                                             "it or others may write it)")
    ready_timeout_s: float = setting(300.0, "a worker not ready this long after its start is restarted; a reload "
                                            "onto a model no worker gets ready on within it is rolled back")
    unready_restart_s: float = setting(10.0, "liveness: restart a worker whose /readyz fails this long after it was "
                                             "ready, or whose /healthz does not answer this long")


@dataclass
class ClusterOptions(SupervisorOptions, FrontOptions, WorkerOptions):
    """Every option of `vqa-async cluster` (groups listed last to first: a dataclass takes its bases' fields in
    reverse order). Mutable: a test points runtime_dir at its own folder."""


OPTION_GROUPS = (WorkerOptions, FrontOptions, SupervisorOptions)


def add_arguments(cl: argparse.ArgumentParser) -> None:
    """Every flag of `vqa-async cluster`: its own (one argument group per concern), then the workers' settings."""
    from vqa_async.config import add_arguments as add_settings

    cl.add_argument("action", nargs="?", choices=["run", "reload"], default="run",
                    help="run (default), or reload: a rolling reload of the cluster running on --port")
    cl.add_argument("--wait-s", type=float, default=RELOAD_WAIT_S, help="reload: how long to wait for the outcome")
    for group in OPTION_GROUPS:
        flags = cl.add_argument_group(*group_title(group))
        add_flags(flags, group, env=False)
        if group is WorkerOptions:  # parts of --backend-dns, not options of their own
            flags.add_argument("--resolver", default=None, metavar="IP:PORT",
                               help="the DNS server for --backend-dns (default: the nameservers of /etc/resolv.conf)")
            flags.add_argument("--backend-dns-slots", type=int, default=DNS_SLOTS,
                               help="the most workers --backend-dns may list (HAProxy's server-template slots)")
    add_settings(cl, exclude=FRONT_ONLY)


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """`vqa-async cluster`'s flags as ClusterOptions, checked (tests/test_deploy.py renders the manifests' front
    with it)."""
    values = {f.name: getattr(args, dest(f)) for f in dataclasses.fields(ClusterOptions)}
    remote = [parse_backend(b) for b in args.backend or []]
    dns = parse_backend_dns(args.backend_dns, args.resolver, args.backend_dns_slots) if args.backend_dns else None
    if args.resolver and not dns:
        raise ValueError("--resolver only applies to --backend-dns")
    if args.workers < 0 or (args.workers == 0 and not remote and not dns):
        raise ValueError("--workers 0 needs workers elsewhere: --backend HOST:PORT or --backend-dns NAME:PORT")
    if (args.front_tls_cert is None) != (args.front_tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.front_tls_cert:
        from vqa_async.cluster.tls import check_pair

        check_pair(args.front_tls_cert, args.front_tls_key)
    if args.rate_limit < 0:
        raise ValueError("--rate-limit must be 0 (no limit) or more")
    values.update(devices=[d for d in (args.devices or "").split(",") if d], backends=remote, backend_dns=dns,
                  runtime_dir=Path(args.runtime_dir) if args.runtime_dir else None,
                  retry_body_bytes=args.retry_body_kb * 1024)
    return ClusterOptions(**values)
