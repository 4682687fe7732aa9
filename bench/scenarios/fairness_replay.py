"""How low can the small client's P95 go? The fairness workload replayed on the measured batch cost, noise-free.

    python -m bench fairness-replay [--device cpu|cuda] [--seconds 20] [--overhead-ms 3]

`python -m bench fairness` measures the real thing, but on a shared CPU box its figures swing 2x from run to run. This
measures the demo model's batch cost curve on the device (the time of one model call against its questions and
its distinct images; the minimum of several calls, so other processes' load drops out), then replays the same
workload (one client at concurrency 64 with 4-question requests, one at concurrency 1 with single questions) on
the real `BatchCollector` with a virtual clock: one model call at a time, no preemption, each call costing what
the curve says; a client sends its next request `--overhead-ms` after an answer (HTTP and preprocessing), and
that time is counted in its latency too. Every request is about a new image, as the fairness scenario sends
them, so the vision encoder runs once per request. The last line is JSON: the cost curve and one row per
scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.lib.loadgen import percentile
from vqa_async.batching.collect import BatchCollector
from vqa_async.batching.work import WorkItem

BIG_CONCURRENCY, BIG_QUESTIONS = 64, 4
NEW_EVERY_TIME = 10**9  # distinct images a client cycles through: every upload is new


def cost_curve(device: str, max_size: int, passes: int) -> tuple[list[float], list[float]]:
    """(vision_ms[k] for k distinct images, decoder_ms[n] for n questions), index 0 unused. Every size is timed
    once per pass, the sizes in a new random order each pass, and the minimum kept: a burst of load from other
    processes lands on a few calls of different sizes, not on all calls of one size."""
    from bench.lib.loadgen import easy_vqa_requests
    from vqa_async.model.answer import Answerer
    from vqa_async.model.loader import load_model

    torch.set_num_threads(1)  # as the fairness scenario's serve (--torch-threads 1)
    m = load_model(None, device=device)
    a = Answerer(m.model, m.tokenizer, m.device, m.dtype, decoder="fast")
    questions = [q for _, q in easy_vqa_requests(max_size)]
    one = a.encode_images(torch.zeros(1, 3, m.image_res, m.image_res, dtype=torch.uint8))
    calls: dict[tuple[str, int], Any] = {}
    for n in range(1, max_size + 1):
        px = torch.randint(0, 255, (n, 3, m.image_res, m.image_res), dtype=torch.uint8)
        rows, enc = one.expand(n, *one.shape[1:]).contiguous(), m.tokenizer.encode(questions[:n])
        calls["vision", n] = lambda px=px: a.encode_images(px)
        calls["decoder", n] = lambda rows=rows, enc=enc: a.answer_embedded(rows, enc)
    best = {key: float("inf") for key in calls}
    rng = random.Random(0)
    for key in calls:  # warm
        calls[key]()
    for _ in range(passes):
        for key in rng.sample(list(calls), len(calls)):
            t0 = time.perf_counter()
            calls[key]()
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            best[key] = min(best[key], (time.perf_counter() - t0) * 1000)
    return ([0.0] + [round(best["vision", n], 2) for n in range(1, max_size + 1)],
            [0.0] + [round(best["decoder", n], 2) for n in range(1, max_size + 1)])


def line(points: list[float]) -> tuple[float, float]:
    """Least-squares (fixed, per unit) through points[1:], x = 1..n: what one call costs and what each adds."""
    xs, ys = range(1, len(points)), points[1:]
    mx, my = sum(xs) / len(ys), sum(ys) / len(ys)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - per * mx, per


@dataclass
class Sim:
    vision: list[float]
    decoder: list[float]
    overhead_ms: float
    now: float = 0.0  # virtual seconds
    seen: set[str] = field(default_factory=set)  # images the cache holds

    def batch_ms(self, batch: list[WorkItem[tuple[str, float]]]) -> float:
        fresh = {it.payload[0] for it in batch} - self.seen
        self.seen |= fresh
        return (self.vision[len(fresh)] if fresh else 0.0) + self.decoder[sum(it.size for it in batch)]

    async def run(self, clients: dict[str, tuple[int, int, int]], seconds: float, fair: bool, max_size: int,
                  shared_max_size: int = 0) -> dict[str, tuple[list[float], int]]:
        """clients: name -> (concurrency, questions per request, distinct images it cycles through, as
        the fairness scenario's uploads: every one new). Returns name -> (latencies ms, answers)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WorkItem[tuple[str, float]]] = asyncio.Queue()
        collector = BatchCollector(queue, max_size, 0.0, clock=lambda: self.now, fair=fair)
        # What-if: a smaller batch while clients share (served as the executor's cap would be); alone, none.
        cap = shared_max_size if shared_max_size and len(clients) > 1 else None
        arrivals: list[tuple[float, int, str, float]] = []  # (arrival at the queue, request number, client, sent)
        counter = iter(range(10**9))
        sent_by = dict.fromkeys(clients, 0)
        out: dict[str, tuple[list[float], int]] = {name: ([], 0) for name in clients}

        def send(name: str, at: float) -> None:  # half the overhead before the queue, half after the answer
            arrivals.append((at + self.overhead_ms / 2000, next(counter), name, at))

        for name, (conc, _, _) in clients.items():
            for _ in range(conc):
                send(name, 0.0)
        warm, end = 1.0, 1.0 + seconds
        while self.now < end:
            arrivals.sort()
            while arrivals and arrivals[0][0] <= self.now:
                t, _, name, sent_at = arrivals.pop(0)
                _, questions, images = clients[name]
                sent_by[name] += 1
                # The payload: the image's key (the cache) and the send time (the latency).
                queue.put_nowait(WorkItem((f"{name}-{sent_by[name] % images}", sent_at), questions,
                                          loop.create_future(), float("inf"), enqueued_at=t, client=name))
            if not collector.pending():
                self.now = arrivals[0][0]
                continue
            batch = await collector.collect(cap)
            self.now += self.batch_ms(batch) / 1000
            for it in batch:
                answered = self.now + self.overhead_ms / 2000
                if warm <= it.payload[1] and answered <= end:
                    lat, answers = out[it.client]
                    lat.append((answered - it.payload[1]) * 1000)
                    out[it.client] = (lat, answers + it.size)
                send(it.client, answered)
        return out


def scenario(vision: list[float], decoder: list[float], overhead_ms: float, seconds: float, max_size: int,
             fair: bool, shared: int) -> dict[str, Any]:
    """The three phases of the fairness scenario on the replay: the small client alone, the big one alone, both."""

    def run(clients: dict[str, tuple[int, int, int]]) -> dict[str, tuple[list[float], int]]:
        return asyncio.run(Sim(vision, decoder, overhead_ms).run(clients, seconds, fair, max_size, shared))

    small, big = ("small", (1, 1, NEW_EVERY_TIME)), ("big", (BIG_CONCURRENCY, BIG_QUESTIONS, NEW_EVERY_TIME))
    s_alone, b_alone, both = run(dict([small])), run(dict([big])), run(dict([small, big]))
    p95 = {k: percentile(sorted(v[0]), 95) for k, v in (("alone", s_alone["small"]), ("shared", both["small"]))}
    rate = {"alone": b_alone["big"][1] / seconds, "shared": both["big"][1] / seconds}
    return {"small_p95_alone_ms": p95["alone"], "small_p95_shared_ms": p95["shared"],
            "ratio": round(p95["shared"] / p95["alone"], 2), "big_answers_per_s_alone": round(rate["alone"], 1),
            "big_answers_per_s_shared": round(rate["shared"], 1),
            "big_share": round(rate["shared"] / rate["alone"], 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=16, help="serve's max batch (16 on CPU, 64 on CUDA)")
    p.add_argument("--seconds", type=float, default=20.0, help="virtual seconds per phase")
    p.add_argument("--passes", type=int, default=11, help="timings of each batch size (the minimum is kept)")
    p.add_argument("--overhead-ms", type=float, default=3.0, help="a request's time outside the model")
    p.add_argument("--shared", default="13,12,8,5",
                   help="also replay fair scheduling with the batch capped at these sizes while both clients are "
                        "active (a what-if: serve has no such cap)")
    args = p.parse_args(argv)
    measured = cost_curve(args.device, args.max_batch_size, args.passes)
    fits = [line(points) for points in measured]
    print(f"cost of one model call, ms (minimum of {args.passes} calls):", file=sys.stderr)
    for n in range(1, args.max_batch_size + 1):
        print(f"  {n:3d}: vision of {n} images {measured[0][n]:7.2f}   decoder of {n} questions {measured[1][n]:7.2f}",
              file=sys.stderr)
    for name, (fixed, per) in zip(("vision", "decoder"), fits):
        print(f"  {name}: {fixed:.2f} ms a call + {per:.2f} ms each", file=sys.stderr)
    # The replay runs on the fitted lines: a noisy point must not decide between two schedulers.
    vision, decoder = ([0.0] + [fixed + per * n for n in range(1, args.max_batch_size + 1)] for fixed, per in fits)
    rows = []
    policies = [("fifo", False, 0), ("fair", True, 0)]
    policies += [(f"fair, cap {n}", True, n) for n in map(int, args.shared.split(",")) if n]
    for name, fair, shared in policies:
        row = {"scheduler": name, **scenario(vision, decoder, args.overhead_ms, args.seconds,
                                             args.max_batch_size, fair, shared)}
        print(f"{name:16s} small p95 {row['small_p95_alone_ms']:6.1f} -> {row['small_p95_shared_ms']:6.1f} ms "
              f"({row['ratio']}x)   big {row['big_answers_per_s_alone']:6.1f} -> "
              f"{row['big_answers_per_s_shared']:6.1f} answers/s ({row['big_share']:.0%})", file=sys.stderr)
        rows.append(row)
    print(json.dumps({"device": args.device, "vision_ms": measured[0][1:], "decoder_ms": measured[1][1:],
                      "vision_fit_ms": [round(x, 3) for x in fits[0]], "decoder_fit_ms": [round(x, 3) for x in fits[1]],
                      "rows": rows}))


if __name__ == "__main__":
    main()
