"""The one entry point: `vqa-async serve | cluster | eval | convert | synth | batch`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from vqa_async.cluster.backends import DNS_SLOTS

if TYPE_CHECKING:
    from vqa_async.cluster.supervisor import ClusterOptions

log = logging.getLogger("vqa_async")


def _setup_logging(level: str = "INFO") -> None:
    from vqa_async.http.tracing import RequestIdFilter

    # `rid` is the X-Request-ID of the request being served ("-" outside one): a client's report finds its lines
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] rid=%(request_id)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from vqa_async.app import init_app
    from vqa_async.config import settings_from_args
    from vqa_async.http import server

    settings = settings_from_args(args)
    app = init_app(settings)
    if settings.loop == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    scheme = "https" if settings.tls_cert else "http"
    where = f"unix:{settings.unix_socket}" if settings.unix_socket else f"{scheme}://{settings.host}:{settings.port}"
    log.info("serving on %s", where)
    # SIGTERM/SIGINT: stop accepting, let the handlers in flight (and so everything queued) finish, then the
    # cleanup_ctx stops the batcher and the model thread. A client that disconnects cancels its handler, so
    # its work is skipped before it reaches the model.
    server.run(app, settings, loop)
    log.info("stopped")
    return 0


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """`vqa-async cluster`'s flags as ClusterOptions (tests/test_deploy.py renders the manifests' front with it)."""
    from pathlib import Path

    from vqa_async.cluster.backends import parse_backend, parse_backend_dns
    from vqa_async.cluster.supervisor import ClusterOptions

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


def cmd_cluster(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from vqa_async.cluster.control import NoCluster, request_reload
    from vqa_async.cluster.runtime import RuntimeDirError
    from vqa_async.cluster.supervisor import Cluster
    from vqa_async.config import settings_from_args

    if args.action == "reload":
        try:
            outcome = request_reload(args.port, args.model, Path(args.runtime_dir) if args.runtime_dir else None,
                                     wait_s=args.wait_s)
        except (NoCluster, RuntimeDirError) as e:
            print(f"vqa-async cluster reload: error: {e}", file=sys.stderr)
            return 2
        if not outcome.ok:
            print(f"vqa-async cluster reload: failed: {outcome.reason}", file=sys.stderr)
            return 1
        print(f"cluster (pid {outcome.pid}) on port {args.port} reloaded: every worker runs "
              f"{outcome.model or 'the demo model'}")
        return 0
    settings = settings_from_args(args)
    try:
        return asyncio.run(Cluster(cluster_options(args), settings).run())
    except RuntimeDirError as e:
        print(f"vqa-async cluster: error: {e}", file=sys.stderr)
        return 2


def cmd_eval(args: argparse.Namespace) -> int:
    from vqa_async.model.answer import Answerer
    from vqa_async.model.loader import load_model
    from vqa_async.tools.evaluate import evaluate

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    answerer = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype, decoder=args.decoder)
    dump = open(args.dump, "w", encoding="utf-8") if args.dump else None  # noqa: SIM115
    try:
        result = evaluate(loaded, answerer, limit=args.limit, batch_size=args.batch_size, dump=dump)
        result["decoder"] = args.decoder
    finally:
        if dump:
            dump.close()
    print(json.dumps(result))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vqa_async.model.loader import parse_dtype
    from vqa_async.tools.convert import convert

    report = convert(args.src, args.dst, dtype=parse_dtype(args.dtype))
    for line in report.lines():
        print(line)
    print(f"wrote {args.dst}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from vqa_async.model.loader import parse_dtype
    from vqa_async.tools.synth import synth

    dtype = parse_dtype(args.dtype)
    assert dtype is not None  # argparse's choices name a dtype
    n = synth(args.preset, args.dst, dtype=dtype, seed=args.seed)
    print(f"wrote {args.dst}: preset {args.preset}, {n / 1e6:.1f} M parameters, {args.dtype}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from vqa_async import batch_job

    return batch_job.main(args)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from vqa_async.config import add_arguments

    p = argparse.ArgumentParser(prog="vqa-async", description="Serve ModelScope's mPLUG VQA model.")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR [env VQA_LOG_LEVEL, default INFO]")
    sub = p.add_subparsers(dest="command", required=True)

    sv = sub.add_parser("serve", help="one micro-batching HTTP server process")
    add_arguments(sv, exclude=("log_level",))
    sv.set_defaults(func=cmd_serve)

    cl = sub.add_parser("cluster", help="N serve processes behind HAProxy, supervised (the main job)")
    cl.add_argument("action", nargs="?", choices=["run", "reload"], default="run",
                    help="run (default), or reload: a rolling reload of the cluster running on --port")
    cl.add_argument("--workers", type=int, default=2, help="serve processes on this machine (0: only remote ones)")
    cl.add_argument("--host", default="127.0.0.1", help="address HAProxy listens on")
    cl.add_argument("--port", type=int, default=8080, help="HAProxy's port: the single entry point")
    cl.add_argument("--stats-port", type=int, default=0, help="HAProxy stats page and /metrics (default port+1)")
    cl.add_argument("--devices", default=None, help="spread workers over these, e.g. cuda:0,cuda:1")
    cl.add_argument("--backend", action="append", help="HOST:PORT of a `vqa-async serve` elsewhere (repeatable)")
    cl.add_argument("--backend-dns", default=None, metavar="NAME:PORT",
                    help="a DNS name whose A records are `vqa-async serve` hosts (e.g. a Kubernetes headless "
                         "Service); HAProxy re-resolves it every second and adds or removes workers without a reload")
    cl.add_argument("--resolver", default=None, metavar="IP:PORT",
                    help="the DNS server for --backend-dns (default: the nameservers of /etc/resolv.conf)")
    cl.add_argument("--backend-dns-slots", type=int, default=DNS_SLOTS,
                    help="the most workers --backend-dns may list (HAProxy's server-template slots)")
    cl.add_argument("--queue-timeout-s", type=float, default=5.0, help="HAProxy queue wait before a 503")
    cl.add_argument("--server-maxconn", type=int, default=0, help="requests in flight per worker (0: 2x batch)")
    cl.add_argument("--haproxy-log", action="store_true",
                    help="HAProxy's request log on stderr: one JSON line per request, the access log's keys")
    cl.add_argument("--retry-body-kb", type=_at_least(16), default=1024,
                    help="uploads up to this size are retried on another worker if theirs dies (HAProxy buffers "
                         "them; a bigger buffer costs HAProxy more CPU per request)")
    cl.add_argument("--runtime-dir", default=None,
                    help="where haproxy.cfg, its socket and state.json live (default /tmp/vqa-async-cluster-PORT; "
                         "created 0700, refused if another user owns it or others may write it)")
    cl.add_argument("--ready-timeout-s", type=float, default=300.0,
                    help="a worker not ready this long after its start is restarted; a reload onto a model no "
                         "worker gets ready on within it is rolled back")
    cl.add_argument("--unready-restart-s", type=float, default=10.0,
                    help="liveness: restart a worker whose /readyz fails this long after it was ready, or whose "
                         "/healthz does not answer this long")
    cl.add_argument("--spares", type=_at_least(0), default=1,
                    help="warm pre-imported processes kept waiting to replace a dead worker in seconds (0: none)")
    cl.add_argument("--max-conn-per-source", type=_at_least(0), default=256,
                    help="connections one client address may hold open; more get 429 (0: no limit)")
    cl.add_argument("--rate-limit-per-source", type=float, default=0.0,
                    help="requests per second one client address may send, averaged over 10 s; more get 429 "
                         "(0: no limit)")
    # The front's TLS and per-client rate: HAProxy's, so not passed on to the workers (hence their own dests).
    cl.add_argument("--tls-cert", dest="front_tls_cert", default=None, metavar="PEM",
                    help="HAProxy serves HTTPS (HTTP/2 and 1.1) with this certificate (chain); needs --tls-key")
    cl.add_argument("--tls-key", dest="front_tls_key", default=None, metavar="PEM", help="the key of --tls-cert")
    cl.add_argument("--rate-limit", type=float, default=0.0, metavar="R",
                    help="requests per second one client may send, averaged over 10 s; the client is its API key "
                         "(Authorization or X-API-Key) or else its address; more get 429 (0: no limit)")
    cl.add_argument("--wait-s", type=float, default=900.0,
                    help="reload: how long to wait for the outcome")
    # TLS is terminated by the cluster's HAProxy, not by its workers
    add_arguments(cl, exclude=("host", "port", "unix_socket", "log_level", "tls_cert", "tls_key"))
    cl.set_defaults(func=cmd_cluster)

    ev = sub.add_parser("eval", help="accuracy on the easy-VQA test split")
    ev.add_argument("--model", default=None, help="serving directory (default: the shipped demo model)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--limit", type=int, default=None, help="first N questions only")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--decoder", choices=["fast", "reference"], default="fast",
                    help="fast: cached keys/values (same answers); reference: ModelScope's own beam search")
    ev.add_argument("--dump", default=None, help="write one JSON line per question: question, answer, label")
    ev.set_defaults(func=cmd_eval)

    cv = sub.add_parser("convert", help="ModelScope model directory -> serving directory")
    cv.add_argument("src")
    cv.add_argument("dst")
    cv.add_argument("--dtype", default="auto", help="float32 | float16 | bfloat16 (default: keep)")
    cv.set_defaults(func=cmd_convert)

    sy = sub.add_parser("synth", help="random-weight replica of mPLUG with the real shapes")
    sy.add_argument("--preset", choices=["large", "base", "demo", "photo504"], default="large")
    sy.add_argument("dst")
    sy.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(func=cmd_synth)

    from vqa_async.batch_job import add_arguments as batch_arguments

    ba = sub.add_parser("batch", help="answer a JSONL file of requests (OpenAI Batch or plain) through a running "
                                      "server; resumable")
    batch_arguments(ba)
    ba.set_defaults(func=cmd_batch)
    return p


def _quiet_openmp_threads() -> None:
    """OpenMP threads that sleep when idle instead of spinning, unless the environment says otherwise. It must be
    set before torch loads libgomp. torch's threads otherwise spin for CPU between parallel regions, against the
    threads decoding uploads and the event loop: one `serve` answered photos 3.5x slower with them spinning
    (bench/RESULTS.md, photos)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_openmp_threads()
    args = build_parser().parse_args(argv)
    level = (args.log_level or os.environ.get("VQA_LOG_LEVEL", "INFO")).upper()
    from vqa_async.config import LOG_LEVELS

    if level not in LOG_LEVELS:
        print(f"vqa-async: error: invalid log level {level!r}: expected {', '.join(LOG_LEVELS)}", file=sys.stderr)
        return 2
    args.log_level = level
    if args.command == "batch":  # a client of a server: none of the server's stack (torch) to import
        return int(args.func(args))
    _setup_logging(level)
    from vqa_async.model.loader import ModelLoadError
    from vqa_async.tools.convert import ConvertError

    try:
        return int(args.func(args))
    except (ModelLoadError, ConvertError, ValueError, OSError) as e:
        print(f"vqa-async {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
