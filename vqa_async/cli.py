"""The one entry point: `vqa-async serve | cluster | eval | convert | synth | batch`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from vqa_async.cluster.options import cluster_options as cluster_options  # tests render the front with it


def cmd_serve(args: argparse.Namespace) -> int:
    from vqa_async.app import serve
    from vqa_async.config import settings_from_args

    serve(settings_from_args(args))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from vqa_async.cluster.control import NoCluster, request_reload
    from vqa_async.cluster.runtime import RuntimeDirError

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
    from vqa_async.cluster.supervisor import Cluster
    from vqa_async.config import settings_from_args

    settings = settings_from_args(args)
    try:
        return asyncio.run(Cluster(cluster_options(args), settings).run())
    except RuntimeDirError as e:
        print(f"vqa-async cluster: error: {e}", file=sys.stderr)
        return 2


def cmd_eval(args: argparse.Namespace) -> int:
    from vqa_async.model.answer import Answerer
    from vqa_async.model.evaluate import evaluate
    from vqa_async.model.loader import load_model

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
    from vqa_async.model.convert import ConvertError, convert
    from vqa_async.model.loader import parse_dtype

    try:
        report = convert(args.src, args.dst, dtype=parse_dtype(args.dtype))
    except ConvertError as e:
        raise ValueError(str(e)) from e  # reported as any bad input is, by main
    for line in report.lines():
        print(line)
    print(f"wrote {args.dst}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from vqa_async.model.loader import parse_dtype
    from vqa_async.model.synth import synth

    dtype = parse_dtype(args.dtype)
    assert dtype is not None  # argparse's choices name a dtype
    n = synth(args.preset, args.dst, dtype=dtype, seed=args.seed)
    print(f"wrote {args.dst}: preset {args.preset}, {n / 1e6:.1f} M parameters, {args.dtype}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from vqa_async.client import bulk

    return bulk.main(args)


def build_parser() -> argparse.ArgumentParser:
    import dataclasses

    from vqa_async.cluster.options import add_arguments as cluster_arguments
    from vqa_async.config import LoggingSettings, add_arguments
    from vqa_async.config.fields import help_text

    p = argparse.ArgumentParser(prog="vqa-async", description="Serve ModelScope's mPLUG VQA model.")
    # Every command's log level, so before the command (`vqa-async --log-level DEBUG serve`).
    level = next(f for f in dataclasses.fields(LoggingSettings) if f.name == "log_level")
    p.add_argument("--log-level", default=None, help=help_text(LoggingSettings, level, env=True))
    sub = p.add_subparsers(dest="command", required=True)

    sv = sub.add_parser("serve", help="one micro-batching HTTP server process")
    add_arguments(sv, exclude=("log_level",))
    sv.set_defaults(func=cmd_serve)

    cl = sub.add_parser("cluster", help="N serve processes behind HAProxy, supervised (the main job)")
    cluster_arguments(cl)
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

    from vqa_async.client.bulk import add_arguments as batch_arguments

    ba = sub.add_parser("batch", help="answer a JSONL file of requests (OpenAI Batch or plain) through a running "
                                      "server; resumable")
    batch_arguments(ba)
    ba.set_defaults(func=cmd_batch)
    return p


def _quiet_openmp_threads() -> None:
    """OpenMP threads that sleep when idle instead of spinning, unless the environment says otherwise. It must be
    set before torch loads libgomp. torch's threads otherwise spin for CPU between parallel regions, against the
    threads decoding uploads and the event loop, and one `serve` answered photos several times slower with them
    spinning (bench/RESULTS.md, "Figures moved out of the code")."""
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
    from vqa_async.http.tracing import setup_logging
    from vqa_async.model.files import ModelLoadError  # not loader.py: `cluster` never imports torch

    setup_logging(level)
    try:
        return int(args.func(args))
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"vqa-async {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
