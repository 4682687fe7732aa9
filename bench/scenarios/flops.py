"""flops: FLOPs per answer counted on the actual model, and the model FLOP utilisation (MFU) of a sweep's rows.

    python -m bench flops [--model DIR] [--device cuda] [--batch 16] [--images photos]
        [--results DIR/results.json] [--peak-tflops X --peak-source TEXT]

Counts, with `torch.utils.flop_counter.FlopCounterMode`, the FLOPs of one real batch on the model at its own
input size: `--batch` distinct images through the vision encoder and one question each through the text
encoder, fusion and the decoder (the fast decoder, as `serve` runs it), so the answers have the length this model
gives them. FLOPs per answer = the batch's FLOPs / its answers. With `--results` (a sweep's results.json), each
row's MFU = answers/s x FLOPs per answer / the device's stated peak (dense FP16/BF16 tensor FLOP/s). The peak
comes from `--peak-tflops` (name its source in `--peak-source`) or, for a GPU this knows, from its vendor's
datasheet (printed with the figure); without one, no MFU is given. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# Dense (no sparsity) FP16/BF16 tensor-core peaks, SXM parts, from NVIDIA's datasheets.
STATED_PEAKS = {
    "H200": (989.5, "NVIDIA H200 Tensor Core GPU datasheet: FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity, "
                    "989.5 dense (SXM)"),
    "H100": (989.5, "NVIDIA H100 Tensor Core GPU datasheet: FP16/BF16 Tensor Core 1,979 TFLOPS with sparsity, "
                    "989.5 dense (SXM)"),
    "A100": (312.0, "NVIDIA A100 Tensor Core GPU datasheet: FP16/BF16 Tensor Core 312 TFLOPS dense"),
    "L40S": (362.05, "NVIDIA L40S datasheet: FP16/BF16 Tensor Core 733 TFLOPS with sparsity, 362.05 dense"),
}


def stated_peak(device: str) -> tuple[float, str] | None:
    """(TFLOP/s, source) for the GPU this process sees, if its name is one we know."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in STATED_PEAKS.items():
        if key in name:
            return peak[0], f"{peak[1]} (device: {name})"
    return None


def count(model: str | None, device: str, batch: int, images: str | None) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.lib.workloads import source_images
    from vqa_async.model.answer import Answerer
    from vqa_async.model.loader import load_model
    from vqa_async.model.preprocess import UploadPixels

    loaded = load_model(model, device=device)
    answerer = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype, decoder="fast")
    pictures = source_images(images)[:batch]
    up = UploadPixels(loaded.image_res, 10**8)
    pixels = torch.stack([up.pixels(up.decode(p.data)) for p in pictures])
    questions = loaded.tokenizer.encode([p.question for p in pictures])
    with torch.inference_mode():
        answerer.answer_embedded(answerer.encode_images(pixels[:2]), type(questions)(
            questions.input_ids[:2], questions.attention_mask[:2]))  # warm-up: lazy inits are not counted
        with FlopCounterMode(display=False) as vision_counter:
            embeds = answerer.encode_images(pixels)
        with FlopCounterMode(display=False) as text_counter:
            answers = answerer.answer_embedded(embeds, questions)
    vision, text = vision_counter.get_total_flops(), text_counter.get_total_flops()
    n = len(answers)
    return {"model": str(loaded.model_dir), "device": str(loaded.device), "dtype": str(loaded.dtype),
            "image_res": loaded.image_res, "batch": n, "images": images or "easy-VQA test split",
            "answer_tokens_mean": round(statistics.mean(len(a.token_ids) for a in answers), 2),
            "vision_flops_per_answer": vision / n, "text_flops_per_answer": text / n,
            "flops_per_answer": (vision + text) / n}


def mfu_rows(results: Path, flops_per_answer: float, peak_tflops: float | None) -> list[dict[str, Any]]:
    out = []
    for r in json.loads(results.read_text()):
        rate = r["answers_per_s"]
        achieved = rate * flops_per_answer / 1e12
        out.append({"system": r["system"], "concurrency": r["concurrency"], "workload": r.get("workload"),
                    "answers_per_s": rate, "answers_per_s_min": r.get("answers_per_s_min"),
                    "answers_per_s_max": r.get("answers_per_s_max"), "p95_ms": r.get("p95_ms"),
                    "failures": r.get("failures"), "cache_hits": r.get("cache_hits"),
                    "achieved_tflops": round(achieved, 3),
                    "mfu": round(achieved / peak_tflops, 4) if peak_tflops else None})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench flops", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--images", default=None, help="`photos` or a folder (default: easy-VQA)")
    ap.add_argument("--results", default=None, help="a sweep's results.json: MFU per row")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's stated dense peak")
    ap.add_argument("--peak-source", default=None, help="where --peak-tflops comes from (printed with it)")
    args = ap.parse_args(argv)
    counted = count(args.model, args.device, args.batch, args.images)
    peak = (args.peak_tflops, args.peak_source or "given with --peak-tflops") if args.peak_tflops else \
        stated_peak(args.device)
    gflop = {k: counted[f"{k}flops_per_answer"] / 1e9 for k in ("", "vision_", "text_")}
    print(f"{gflop['']:.3f} GFLOP per answer (vision {gflop['vision_']:.3f}, text and decoder {gflop['text_']:.3f}), "
          f"counted by FlopCounterMode over one batch of {counted['batch']} at {counted['image_res']} px, "
          f"{counted['answer_tokens_mean']} answer tokens on average", file=sys.stderr)
    print(f"peak: {peak[0]} TFLOP/s, source: {peak[1]}" if peak else
          f"peak: none stated for {args.device} (give --peak-tflops and --peak-source): no MFU", file=sys.stderr)
    out: dict[str, Any] = {**counted, "peak_tflops": peak[0] if peak else None,
                           "peak_source": peak[1] if peak else None}
    if args.results:
        out["rows"] = mfu_rows(Path(args.results), counted["flops_per_answer"], peak[0] if peak else None)
        for r in out["rows"]:
            mfu = f"MFU {r['mfu']:.2%}" if r["mfu"] is not None else "MFU –"
            print(f"{r['system']:8s} c={r['concurrency']:4d} {r['answers_per_s']:8.1f} answers/s  "
                  f"{r['achieved_tflops']:8.3f} TFLOP/s  {mfu}  P95 {r['p95_ms']} ms  failures {r['failures']}  "
                  f"cache hits {r['cache_hits']}", file=sys.stderr)
    print(json.dumps(out))
