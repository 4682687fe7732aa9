"""The peer: the same model layer behind LitServe (Lightning AI's server), set up as its documentation says.

    python -m bench.litserve_vqa --port 8000 [--model DIR] [--device cpu] [--max-batch-size 16]
        [--batch-timeout 0.005] [--workers-per-device 2] [--torch-threads N] [--decode pillow|fast]

A LitAPI with LitServe's own dynamic batching (`max_batch_size`, `batch_timeout`), two inference workers per
device. `--decode pillow` (the default) decodes as a LitServe user would: `decode_request` reads the form's upload
with Pillow and applies ModelScope's torchvision transform (bicubic resize, ToTensor, CLIP's Normalize: what
`MPlugPreprocessor` does). `--decode fast` uses our upload path instead (`vqa_async.model.preprocess.UploadPixels`:
the reduced DCT scale and torch's resize, as `vqa-async serve` does by default), so that the serving design and
the upload path are measured apart. `predict` answers the batch with the project's `Answerer` (fast decoder), so
the model work is the same as in `vqa-async serve`. POST /v1/vqa (multipart `image`, `question`) answers
{"answer": ...}; /readyz is LitServe's health check. Each worker's torch threads: `--torch-threads` (the launcher
gives the cores divided by the workers, as `vqa-async cluster` sets them: two workers of all-core torch would only
fight over the cores).
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Any

import litserve as ls


class VqaLitAPI(ls.LitAPI):
    def __init__(self, model: str | None, torch_threads: int, decode: str = "pillow", **kw: Any) -> None:
        super().__init__(**kw)
        self.model_dir = model
        self.torch_threads = torch_threads
        self.decode = decode

    def setup(self, device: str) -> None:
        import torch

        from vqa_async.model.answer import Answerer
        from vqa_async.model.loader import load_model
        from vqa_async.model.preprocess import UploadPixels, image_transform

        torch.set_num_threads(self.torch_threads)
        self.loaded = load_model(self.model_dir, device=device)
        self.answerer = Answerer(self.loaded.model, self.loaded.tokenizer, self.loaded.device, self.loaded.dtype,
                                 decoder="fast")
        self.transform = image_transform(self.loaded.image_res)
        self.upload = UploadPixels(self.loaded.image_res, 10**8) if self.decode == "fast" else None

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe then passes the form
        from PIL import Image

        upload = request["image"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        if self.upload is not None:  # our upload path: uint8 pixels, normalized on the device by the Answerer
            return self.upload.pixels(self.upload.decode(data)), str(request["question"])
        image = Image.open(io.BytesIO(data)).convert("RGB")  # MPlugPreprocessor: load_image(...).convert("RGB")
        return self.transform(image), str(request["question"])

    def batch(self, inputs: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
        return inputs

    def predict(self, batch: list[tuple[Any, str]]) -> list[str]:
        pixels = [p for p, _ in batch]
        questions = self.loaded.tokenizer.encode([q for _, q in batch])
        return [a.text for a in self.answerer.answer(pixels, list(range(len(batch))), questions)]

    def unbatch(self, output: list[str]) -> list[str]:
        return output

    def encode_response(self, output: str) -> dict[str, str]:
        return {"answer": output}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout", type=float, default=0.005, help="seconds LitServe waits to fill a batch")
    ap.add_argument("--workers-per-device", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=0, help="per worker (0: the cores divided by the workers)")
    ap.add_argument("--decode", choices=["pillow", "fast"], default="pillow",
                    help="pillow: every pixel, as a LitServe user writes it; fast: our upload path")
    args = ap.parse_args()
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    threads = args.torch_threads or (max(1, (os.cpu_count() or 1) // args.workers_per_device)
                                     if accelerator == "cpu" else 1)
    api = VqaLitAPI(args.model, threads, args.decode, max_batch_size=args.max_batch_size,
                    batch_timeout=args.batch_timeout, api_path="/v1/vqa")
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=args.workers_per_device,
                          timeout=300, healthcheck_path="/readyz")
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
