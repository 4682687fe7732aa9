"""Reference (ModelScope's beam search) against the fast decoder, on the same easy-VQA questions.

    python -m bench decoder [--model DIR] [--batch 16] [--n 200] [--device cpu] [--dtype auto] [--profile]

The image embeddings are computed once and shared; each decoder then answers every batch with
`Answerer.answer_embedded` (text encoder + fusion + beam search: the part the decoder changes), the two decoders
alternating batch by batch, after one small warm-up batch each. `*_answers_per_s` counts that whole call;
`*_decode_s` is the beam search alone inside it (`--profile` tables cover only that, for one batch of each).
Progress and the tables go to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vqa_async.model.answer import Answered, Answerer
from vqa_async.model.loader import load_model
from vqa_async.model.preprocess import EncodedQuestions, decode_image, image_transform

DECODERS = ("reference", "fast")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecodeClock:
    """Times the beam search inside `answer_embedded`, whichever decoder runs it; profiles it on request."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.profiler: Any = None  # a torch.profiler.profile to run the next call under

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            if self.profiler is not None:
                with self.profiler:
                    out = fn(*args, **kwargs)
                    sync(self.device)
            else:
                out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - t0
            return out
        return timed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="serving directory (default: the shipped demo model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=200, help="number of easy-VQA test questions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "matmul"],
                    help="the fast decoder's attention (auto: SDPA in fp32, the reference's op sequence in fp16/bf16)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables for one batch of each decoder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import easy_vqa

    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype)
    device = loaded.device
    log(f"loaded {loaded.model_dir} on {device} in {loaded.dtype} ({time.perf_counter() - t0:.1f}s), "
        f"{torch.get_num_threads()} threads")

    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    n = min(args.n, len(questions))
    questions, image_ids = questions[:n], image_ids[:n]
    distinct = list(dict.fromkeys(image_ids))
    tf = image_transform(loaded.image_res)
    answerers = {name: Answerer(loaded.model, loaded.tokenizer, device, loaded.dtype, decoder=name,
                                attention=args.attention) for name in DECODERS}
    answerer = answerers["reference"]

    t0 = time.perf_counter()
    chunks = []
    for s in range(0, len(distinct), 32):
        pixels = [tf(decode_image(Path(paths[i]).read_bytes(), max_pixels=10**7)) for i in distinct[s:s + 32]]
        chunks.append(answerer.encode_images(torch.stack(pixels)))
    embeds = torch.cat(chunks)
    sync(device)
    image_s = time.perf_counter() - t0
    log(f"{n} questions about {len(distinct)} images; image embeddings {tuple(embeds.shape)} in {image_s:.1f}s")

    index = torch.as_tensor([distinct.index(i) for i in image_ids], device=embeds.device)
    batches = []
    for s in range(0, n, args.batch):
        batches.append((embeds.index_select(0, index[s:s + args.batch]),
                        loaded.tokenizer.encode(questions[s:s + args.batch])))

    # Time the beam search inside answer_embedded: the reference's `model.generation`, the fast path's generate.
    clocks = {name: DecodeClock(device) for name in DECODERS}
    model = loaded.model
    model.generation = clocks["reference"].wrap(model.generation)  # type: ignore[method-assign]

    fast = answerers["fast"].fast
    assert fast is not None
    fast.generate = clocks["fast"].wrap(fast.generate)  # type: ignore[method-assign]

    def run(name: str, batch: tuple[torch.Tensor, EncodedQuestions]) -> list[Answered]:
        return answerers[name].answer_embedded(*batch)

    first = batches[0][1]
    warm = (batches[0][0][:2], EncodedQuestions(first.input_ids[:2], first.attention_mask[:2]))
    for name in DECODERS:
        run(name, warm)
        clocks[name].seconds = 0.0

    totals = {name: 0.0 for name in DECODERS}
    answers: dict[str, list[Answered]] = {name: [] for name in DECODERS}
    for b, batch in enumerate(batches):
        order = DECODERS if b % 2 == 0 else DECODERS[::-1]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            got = run(name, batch)
            sync(device)
            totals[name] += time.perf_counter() - t0
            answers[name].extend(got)
        log(f"batch {b + 1}/{len(batches)}: reference {totals['reference']:.2f}s, fast {totals['fast']:.2f}s "
            f"(cumulative)")

    identical = sum(r.token_ids == f.token_ids for r, f in zip(answers["reference"], answers["fast"])) / n
    decode_s = {name: clocks[name].seconds for name in DECODERS}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        for name in DECODERS:
            clocks[name].profiler = prof = profile(activities=activities)
            run(name, batches[0])
            clocks[name].profiler = None
            log(f"--- profile: {name} decoder, beam search only, one batch of {len(batches[0][1].input_ids)} ---")
            log(prof.key_averages().table(sort_by=sort, row_limit=20))

    ref_rate = n / totals["reference"]
    fast_rate = n / totals["fast"]
    result = {
        "reference_answers_per_s": round(ref_rate, 3),
        "fast_answers_per_s": round(fast_rate, 3),
        "speedup": round(fast_rate / ref_rate, 3),
        "identical": round(identical, 4),
        "reference_decode_s": round(decode_s["reference"], 3),
        "fast_decode_s": round(decode_s["fast"], 3),
        "decode_speedup": round(decode_s["reference"] / decode_s["fast"], 3),
        "reference_answer_embedded_s": round(totals["reference"], 3),
        "fast_answer_embedded_s": round(totals["fast"], 3),
        "image_encode_s": round(image_s, 3),
        "mean_answer_tokens": round(sum(len(a.token_ids) for a in answers["reference"]) / n, 2),
        "n": n,
        "batch": args.batch,
        "model": str(loaded.model_dir),
        "device": str(device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "attention": "sdpa" if fast.uses_sdpa(loaded.dtype) else "matmul",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
