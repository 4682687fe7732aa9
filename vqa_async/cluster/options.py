"""`vqa-async cluster`'s own options, declared once: their defaults (ClusterOptions), their flags, their checks.

The workers' settings are `serve`'s (vqa_async/config.py), given to `cluster` as flags too; the flags here are
what only the cluster has: how many workers, HAProxy's front, the supervisor's patience.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vqa_async.cluster.backends import DNS_SLOTS, DnsBackends, parse_backend, parse_backend_dns
from vqa_async.cluster.control import RELOAD_WAIT_S

# Uploads up to this size are held whole by HAProxy and so survive a dying worker (see the template). The buffer
# costs HAProxy CPU in proportion to its size on every request (bench/RESULTS.md, "Figures moved out of the
# code"). `cluster --retry-body-kb` sets it.
RETRYABLE_BODY_BYTES = 1 << 20
# Settings that are not passed on to the workers: the front's address is HAProxy's, and TLS ends there.
FRONT_ONLY = ("host", "port", "unix_socket", "log_level", "tls_cert", "tls_key")


@dataclass
class ClusterOptions:
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 8080
    stats_port: int = 0  # 0: port + 1
    devices: list[str] = field(default_factory=list)  # spread workers over these, round robin
    backends: list[str] = field(default_factory=list)  # HOST:PORT of `vqa-async serve` on other machines
    backend_dns: DnsBackends | None = None  # a DNS name listing such workers, re-resolved while running
    queue_timeout_s: float = 5.0
    server_maxconn: int = 0  # 0: twice the workers' max batch size
    runtime_dir: Path | None = None
    ready_timeout_s: float = 300.0
    haproxy_log: bool = False
    retry_body_bytes: int = RETRYABLE_BODY_BYTES  # uploads up to this size survive a dying worker
    unready_restart_s: float = 10.0  # liveness: restart a worker unready (or silent) this long
    spares: int = 1  # warm pre-imported processes waiting to replace a dead worker
    max_conn_per_source: int = 256  # 0: no limit
    rate_limit_per_source: float = 0.0  # requests/s per client address over 10 s; 0: no limit
    rate_limit: float = 0.0  # requests/s per client (its API key, else its address) over 10 s; 0: no limit
    tls_cert: str | None = None  # with tls_key: HAProxy terminates TLS on the front port
    tls_key: str | None = None


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def add_arguments(cl: argparse.ArgumentParser) -> None:
    """Every flag of `vqa-async cluster`: its own (defaults from ClusterOptions), then the workers' settings."""
    from vqa_async.config import add_arguments as add_settings

    d = ClusterOptions()
    cl.add_argument("action", nargs="?", choices=["run", "reload"], default="run",
                    help="run (default), or reload: a rolling reload of the cluster running on --port")
    cl.add_argument("--workers", type=int, default=d.workers,
                    help="serve processes on this machine (0: only remote ones)")
    cl.add_argument("--host", default=d.host, help="address HAProxy listens on")
    cl.add_argument("--port", type=int, default=d.port, help="HAProxy's port: the single entry point")
    cl.add_argument("--stats-port", type=int, default=d.stats_port,
                    help="HAProxy stats page and /metrics (default port+1)")
    cl.add_argument("--devices", default=None, help="spread workers over these, e.g. cuda:0,cuda:1")
    cl.add_argument("--backend", action="append", help="HOST:PORT of a `vqa-async serve` elsewhere (repeatable)")
    cl.add_argument("--backend-dns", default=None, metavar="NAME:PORT",
                    help="a DNS name whose A records are `vqa-async serve` hosts (e.g. a Kubernetes headless "
                         "Service); HAProxy re-resolves it every second and adds or removes workers without a reload")
    cl.add_argument("--resolver", default=None, metavar="IP:PORT",
                    help="the DNS server for --backend-dns (default: the nameservers of /etc/resolv.conf)")
    cl.add_argument("--backend-dns-slots", type=int, default=DNS_SLOTS,
                    help="the most workers --backend-dns may list (HAProxy's server-template slots)")
    cl.add_argument("--queue-timeout-s", type=float, default=d.queue_timeout_s,
                    help="HAProxy queue wait before a 503")
    cl.add_argument("--server-maxconn", type=int, default=d.server_maxconn,
                    help="requests in flight per worker (0: 2x batch)")
    cl.add_argument("--haproxy-log", action="store_true",
                    help="HAProxy's request log on stderr: one JSON line per request, the access log's keys")
    cl.add_argument("--retry-body-kb", type=_at_least(16), default=d.retry_body_bytes // 1024,
                    help="uploads up to this size are retried on another worker if theirs dies (HAProxy buffers "
                         "them; a bigger buffer costs HAProxy more CPU per request)")
    cl.add_argument("--runtime-dir", default=None,
                    help="where haproxy.cfg, its socket and state.json live (default /tmp/vqa-async-cluster-PORT; "
                         "created 0700, refused if another user owns it or others may write it)")
    cl.add_argument("--ready-timeout-s", type=float, default=d.ready_timeout_s,
                    help="a worker not ready this long after its start is restarted; a reload onto a model no "
                         "worker gets ready on within it is rolled back")
    cl.add_argument("--unready-restart-s", type=float, default=d.unready_restart_s,
                    help="liveness: restart a worker whose /readyz fails this long after it was ready, or whose "
                         "/healthz does not answer this long")
    cl.add_argument("--spares", type=_at_least(0), default=d.spares,
                    help="warm pre-imported processes kept waiting to replace a dead worker in seconds (0: none)")
    cl.add_argument("--max-conn-per-source", type=_at_least(0), default=d.max_conn_per_source,
                    help="connections one client address may hold open; more get 429 (0: no limit)")
    cl.add_argument("--rate-limit-per-source", type=float, default=d.rate_limit_per_source,
                    help="requests per second one client address may send, averaged over 10 s; more get 429 "
                         "(0: no limit)")
    # The front's TLS and per-client rate: HAProxy's, so not passed on to the workers (hence their own dests).
    cl.add_argument("--tls-cert", dest="front_tls_cert", default=None, metavar="PEM",
                    help="HAProxy serves HTTPS (HTTP/2 and 1.1) with this certificate (chain); needs --tls-key")
    cl.add_argument("--tls-key", dest="front_tls_key", default=None, metavar="PEM", help="the key of --tls-cert")
    cl.add_argument("--rate-limit", type=float, default=d.rate_limit, metavar="R",
                    help="requests per second one client may send, averaged over 10 s; the client is its API key "
                         "(Authorization or X-API-Key) or else its address; more get 429 (0: no limit)")
    cl.add_argument("--wait-s", type=float, default=RELOAD_WAIT_S,
                    help="reload: how long to wait for the outcome")
    add_settings(cl, exclude=FRONT_ONLY)


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """`vqa-async cluster`'s flags as ClusterOptions, checked (tests/test_deploy.py renders the manifests' front
    with it)."""
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
    return ClusterOptions(workers=args.workers, host=args.host, port=args.port, stats_port=args.stats_port,
                          devices=[d for d in (args.devices or "").split(",") if d], backends=remote,
                          backend_dns=dns, queue_timeout_s=args.queue_timeout_s, server_maxconn=args.server_maxconn,
                          runtime_dir=Path(args.runtime_dir) if args.runtime_dir else None,
                          haproxy_log=args.haproxy_log, retry_body_bytes=args.retry_body_kb * 1024,
                          ready_timeout_s=args.ready_timeout_s, unready_restart_s=args.unready_restart_s,
                          spares=args.spares, max_conn_per_source=args.max_conn_per_source,
                          rate_limit_per_source=args.rate_limit_per_source, rate_limit=args.rate_limit,
                          tls_cert=args.front_tls_cert, tls_key=args.front_tls_key)
