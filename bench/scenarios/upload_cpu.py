"""CPU per image from upload bytes to the model's input tensor, exact (every pixel decoded, as ModelScope does)
vs fast (the server's default: JPEG decoded at the smallest DCT scale >= the input size), one core.

    python -m bench upload-cpu [--res 504] [--repeat 5]

Prints one line per photo size (the median over the photos of that size of each one's best of `--repeat`
thread-CPU times) and a JSON line last. The issue's targets at 504 px: 12 MP <= 40 ms, 2 MP <= 10 ms (fast).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from bench.lib.photos import build
from vqa_async.model.preprocess import UploadPixels

TARGETS_MS = {"12mp": 40.0, "2mp": 10.0}


def size_label(name: str) -> str:
    return name.removesuffix(".jpg").split("-")[1] if name.endswith(".jpg") else "png"


def cpu_ms(up: UploadPixels, data: bytes, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.thread_time()
        up.pixels(up.decode(data))
        best = min(best, (time.thread_time() - t) * 1000)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=504)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    paths = {"exact": UploadPixels(args.res, 10**8, exact=True), "fast": UploadPixels(args.res, 10**8)}
    by_size: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for photo in build():
        data = photo.path.read_bytes()
        label = size_label(photo.path.name) + ("-exif6" if "exif6" in photo.path.name else "")
        for name, up in paths.items():
            by_size[label][name].append(cpu_ms(up, data, args.repeat))
    out = {}
    for label in sorted(by_size, key=lambda s: (s.startswith("png"), len(s), s)):
        exact, fast = (statistics.median(by_size[label][k]) for k in ("exact", "fast"))
        out[label] = {"exact_ms": round(exact, 1), "fast_ms": round(fast, 1)}
        target = TARGETS_MS.get(label)
        verdict = f"  target <= {target:g} ms: {'met' if fast <= target else 'NOT met'}" if target else ""
        print(f"{label:12s} exact {exact:6.1f} ms   fast {fast:6.1f} ms   x{exact / fast:4.1f}{verdict}")
    print(json.dumps({"res": args.res, "cpu_ms_per_image": out}))


if __name__ == "__main__":
    main()
