"""`vqa_requests_waiting`, the signal the workers' HorizontalPodAutoscaler scales on (deploy/kubernetes/
autoscaling.yaml): through the real app and the demo model, it rises with a backlog and falls back to 0."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import FormData

from vqa_async.app import init_app
from vqa_async.config import Settings
from vqa_async.http.app_keys import METRICS

BATCH = 2
REQUESTS = 24


def waiting_in(text: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("vqa_requests_waiting ")]
    return float(line.split()[1])


async def test_requests_waiting_moves_under_load(aiohttp_client: Any, demo_dir: Path,
                                                 easy_vqa_images: list[Path]) -> None:
    # Small batches: 24 requests at once are a backlog of several model calls.
    app = init_app(Settings(model=str(demo_dir), device="cpu", max_batch_size=BATCH, max_wait_ms=1.0))
    client = await aiohttp_client(app)
    registry = app[METRICS].registry
    assert waiting_in(await (await client.get("/metrics")).text()) == 0  # exported, and idle

    async def ask(i: int) -> int:
        f = FormData()
        f.add_field("image", easy_vqa_images[i % len(easy_vqa_images)].read_bytes(), filename="x.png",
                    content_type="image/png")
        f.add_field("question", "what color is the shape?")
        resp = await client.post("/v1/vqa", data=f)
        await resp.read()
        return resp.status

    load = asyncio.gather(*(ask(i) for i in range(REQUESTS)))
    seen: list[float] = []
    while not load.done():
        seen.append(registry.get_sample_value("vqa_requests_waiting") or 0.0)
        await asyncio.sleep(0.005)
    assert await load == [200] * REQUESTS
    # A model call takes at most BATCH of them: at some instant many more were waiting, which an autoscaler
    # would read as a worker behind.
    assert max(seen) >= 3 * BATCH, seen
    assert waiting_in(await (await client.get("/metrics")).text()) == 0  # the backlog gone, the signal too
